//! Node labels, compact: every distinct key and value is stored once per index (interned), and
//! a node keeps a sorted slice of pointers to them. A cluster of 5,000 nodes holding 100 images
//! each has half a million image labels but only as many distinct keys as managed images.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// An interned string.
pub type Sym = Arc<str>;

/// The distinct strings of an index.
#[derive(Debug, Clone, Default)]
pub struct Symbols(HashSet<Sym>);

impl Symbols {
    /// The stored copy of `text`, stored now when it is new.
    pub fn intern(&mut self, text: &str) -> Sym {
        if let Some(sym) = self.0.get(text) {
            return sym.clone();
        }
        let sym: Sym = Arc::from(text);
        self.0.insert(sym.clone());
        sym
    }

    /// Forgets the strings nothing else refers to any more (labels of deleted nodes).
    pub fn prune(&mut self) {
        self.0.retain(|sym| Arc::strong_count(sym) > 1);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Something labels can be looked up in: a node's [`Labels`], or a plain map.
pub trait LabelMap {
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelMap for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// The labels of one node, sorted by key, keys unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Sym, Sym)]>);

impl Labels {
    /// Labels from pairs, interned in `symbols`; a later pair replaces an earlier one with the
    /// same key.
    pub fn new<'a>(
        symbols: &mut Symbols,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        Self::from_syms(
            pairs
                .into_iter()
                .map(|(key, value)| (symbols.intern(key), symbols.intern(value)))
                .collect(),
        )
    }

    /// Labels from interned pairs; a later pair replaces an earlier one with the same key.
    pub fn from_syms(mut pairs: Vec<(Sym, Sym)>) -> Self {
        // Stable: among equal keys the last one given stays last, and wins.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut unique: Vec<(Sym, Sym)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match unique.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => unique.push(pair),
            }
        }
        Self(unique.into_boxed_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(key, value)| (&**key, &**value))
    }

    /// The interned pairs.
    pub fn syms(&self) -> &[(Sym, Sym)] {
        &self.0
    }
}

impl LabelMap for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_interned_sorted_and_unique() {
        let mut symbols = Symbols::default();
        let a = Labels::new(
            &mut symbols,
            [("zone", "a"), ("pool", "web"), ("zone", "b")],
        );
        let b = Labels::new(&mut symbols, [("pool", "web")]);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("pool", "web"), ("zone", "b")]
        );
        assert_eq!(a.label("zone"), Some("b"));
        assert_eq!(a.label("size"), None);
        assert!(Arc::ptr_eq(&a.syms()[0].0, &b.syms()[0].0));
        // "zone", "a", "b", "pool", "web"
        assert_eq!(symbols.len(), 5);
        drop(a);
        symbols.prune();
        assert_eq!(symbols.len(), 2);
    }
}
