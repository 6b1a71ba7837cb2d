//! Errors as Coral prints them: the error and each cause it does not already name, once.

/// `error: cause: cause …`, each cause once. Many errors name their cause in their own
/// message (`state file s.yaml: ImageSet shop/web: spec.images[0]: …`) and report it as their
/// source too; printing the chain as it is would say those things two or three times.
pub fn error_message(error: &anyhow::Error) -> String {
    let mut chain = error.chain();
    let mut message = chain.next().map(ToString::to_string).unwrap_or_default();
    for cause in chain {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// Rows as a table: columns padded to their widest cell, the last one left as it is.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < columns {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            } else {
                line.push_str(cell);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A byte count for people: `512 B`, `1.5 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("permission denied");
        let error = anyhow::Error::new(io).context("cannot read state.yaml");
        assert_eq!(
            error_message(&error),
            "cannot read state.yaml: permission denied"
        );

        let state = crate::index::StateFile::parse(
            "imageSets:\n  - metadata: {name: web, namespace: shop}\n    spec: {images: [\"Bad Ref\"]}\n",
            "s.yaml",
        )
        .expect_err("bad reference");
        let message = error_message(&anyhow::Error::new(state));
        let clauses: Vec<&str> = message.split(": ").collect();
        let mut distinct = clauses.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), clauses.len(), "{message}");
        assert!(
            message.starts_with("state file s.yaml: ImageSet shop/web: spec.images[0]"),
            "{message}"
        );
    }
}
