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
