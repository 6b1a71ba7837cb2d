use serde_json::json;

use super::*;

fn label(image: &str) -> String {
    label_key(&ImageReference::parse(image).expect("reference"))
}

fn set(name: &str, images: &[&str], had: &[&str]) -> ImageSet {
    serde_json::from_value(json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"images": images},
        "status": {"images": had.iter().map(|i| {
            let reference = ImageReference::parse(i).expect("reference");
            json!({"image": i, "normalized": reference.to_string(), "label": label_key(&reference)})
        }).collect::<Vec<_>>()},
    }))
    .expect("ImageSet")
}

fn deployment(name: &str, selector: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"template": {"spec": {"nodeSelector": selector, "containers": []}}},
    })
}

fn users() -> LabelUsers {
    let web = deployment("web", json!({label("nginx:1.27"): "available"}));
    let api = deployment(
        "api",
        json!({label("nginx:1.27"): "available", "pool": "a"}),
    );
    let mut owned = deployment("web-1", json!({label("redis:7.4"): "available"}));
    owned["kind"] = json!("ReplicaSet");
    owned["metadata"]["ownerReferences"] =
        json!([{"kind": "Deployment", "name": "web", "controller": true}]);
    LabelUsers::of(&[web, api, owned])
}

#[test]
fn an_image_dropped_from_the_spec_retires_while_workloads_require_its_label() {
    let set = set(
        "web",
        &["nginx:1.28"],
        &["nginx:1.27", "nginx:1.28", "redis:7.4"],
    );
    let retiring = retiring_images(&set, &[&set], &users());
    assert_eq!(
        retiring,
        [RetiringImage {
            image: "docker.io/library/nginx:1.27".into(),
            label: label("nginx:1.27"),
            workloads: vec!["Deployment shop/api".into(), "Deployment shop/web".into()],
            workload_count: 2,
        }],
        "redis is required only by a ReplicaSet its Deployment owns"
    );
}

#[test]
fn a_deleted_set_retires_every_image_still_required() {
    let mut set = set("web", &["nginx:1.27", "redis:7.4"], &[]);
    set.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    let retiring = retiring_images(&set, &[&set], &users());
    assert_eq!(retiring.len(), 1);
    assert_eq!(retiring[0].image, "docker.io/library/nginx:1.27");
}

#[test]
fn an_image_another_set_keeps_or_no_workload_requires_does_not_retire() {
    let leaving = set("web", &[], &["nginx:1.27"]);
    let keeper = set("other", &["nginx:1.27"], &[]);
    assert_eq!(
        retiring_images(&leaving, &[&leaving, &keeper], &users()),
        []
    );
    assert_eq!(
        retiring_images(&leaving, &[&leaving], &LabelUsers::default()),
        []
    );
}

#[test]
fn retiring_images_stay_retiring_until_released_and_force_removal_ends_it() {
    let mut set = set("web", &["nginx:1.28"], &["nginx:1.28"]);
    set.status.as_mut().expect("status").retiring = vec![RetiringImage {
        image: "docker.io/library/nginx:1.27".into(),
        label: label("nginx:1.27"),
        workloads: vec![],
        workload_count: 1,
    }];
    assert_eq!(
        retiring_images(&set, &[&set], &users()).len(),
        1,
        "still required"
    );
    assert_eq!(
        retiring_images(&set, &[&set], &LabelUsers::default()),
        [],
        "released"
    );
    set.metadata.annotations =
        Some([(FORCE_REMOVE_ANNOTATION.to_string(), "true".to_string())].into());
    assert_eq!(retiring_images(&set, &[&set], &users()), [], "forced");
}

#[test]
fn the_retiring_condition_names_the_workloads_and_what_to_do() {
    let set = set("web", &[], &["nginx:1.27"]);
    let users = users();
    let retiring = retiring_images(&set, &[&set], &users);
    let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let status = with_retiring(ImageSetStatus::default(), retiring, &users, None, &now);
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == RETIRING_CONDITION)
        .expect("condition");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "StillRequired")
    );
    assert!(
        condition.message.starts_with("docker.io/library/nginx:1.27 left this ImageSet, but 2 workload(s) still require the node label: Deployment shop/api, Deployment shop/web; "),
        "{}",
        condition.message
    );
    assert!(condition.message.contains("coral.dev/force-remove=true"));
    // Nothing retiring: no condition.
    let cleared = with_retiring(status, Vec::new(), &users, None, &now);
    assert!(cleared.conditions.is_empty());
    assert!(cleared.retiring.is_empty());
}

#[test]
fn many_workloads_are_named_up_to_ten() {
    let workloads: Vec<_> = (0..15)
        .map(|i| {
            deployment(
                &format!("w{i:02}"),
                json!({label("nginx:1.27"): "available"}),
            )
        })
        .collect();
    let users = LabelUsers::of(&workloads);
    let set = set("web", &[], &["nginx:1.27"]);
    let retiring = retiring_images(&set, &[&set], &users);
    assert_eq!(
        (retiring[0].workloads.len(), retiring[0].workload_count),
        (10, 15)
    );
    let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let status = with_retiring(ImageSetStatus::default(), retiring, &users, None, &now);
    assert!(
        status.conditions[0]
            .message
            .contains("Deployment shop/w09 and 5 more;"),
        "{}",
        status.conditions[0].message
    );
}
