//! The webhook's serving certificate when cert-manager is not used: a self-signed CA and a
//! serving certificate kept in a Secret (mounted by the webhook, which reloads it), the CA in the
//! `caBundle` of Coral's webhook configurations, and the serving certificate renewed before it
//! expires. The CA lives ten years and is kept across renewals, so the `caBundle` stays valid
//! while the webhook pods pick up a renewed certificate.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp, tz::TimeZone};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{Value, json};
use thiserror::Error;

/// Annotation: when the serving certificate expires (RFC 3339).
pub const NOT_AFTER: &str = "coral.dev/not-after";
/// Annotation: when the CA expires (RFC 3339).
pub const CA_NOT_AFTER: &str = "coral.dev/ca-not-after";
/// Annotation: the DNS names of the serving certificate, comma-separated.
pub const DNS_NAMES: &str = "coral.dev/dns-names";

const CA_VALIDITY_DAYS: i64 = 3650;
const CERT_VALIDITY_DAYS: i64 = 365;
/// Renew this long before expiry.
pub const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the Secret's {0} is not valid")]
    Stored(&'static str),
}

/// The names the webhook Service answers to.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// What needs making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    None,
    /// A new serving certificate from the stored CA.
    ServingCert,
    /// A new CA and serving certificate.
    All,
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn has(secret: &Secret, key: &str) -> bool {
    secret.data.as_ref().is_some_and(|d| d.contains_key(key))
}

fn expires_soon(at: Option<&str>, now: Timestamp) -> bool {
    let limit = now
        .checked_add(SignedDuration::from_hours(24 * RENEW_BEFORE_DAYS))
        .unwrap_or(now);
    at.and_then(|t| t.parse::<Timestamp>().ok())
        .is_none_or(|t| t <= limit)
}

/// What the stored Secret needs.
pub fn renewal(secret: Option<&Secret>, dns: &[String], now: Timestamp) -> Renewal {
    let Some(secret) = secret else {
        return Renewal::All;
    };
    if !has(secret, "ca.crt")
        || !has(secret, "ca.key")
        || expires_soon(annotation(secret, CA_NOT_AFTER), now)
    {
        return Renewal::All;
    }
    if !has(secret, "tls.crt")
        || !has(secret, "tls.key")
        || expires_soon(annotation(secret, NOT_AFTER), now)
        || annotation(secret, DNS_NAMES) != Some(dns.join(",").as_str())
    {
        return Renewal::ServingCert;
    }
    Renewal::None
}

fn ca_params(not_after: Timestamp) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "coral webhook CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (year, month, day) = ymd(not_after);
    params.not_after = rcgen::date_time_ymd(year, month, day);
    Ok(params)
}

/// Year, month and day (UTC) of an instant, as rcgen takes validity dates.
fn ymd(at: Timestamp) -> (i32, u8, u8) {
    let civil = at.to_zoned(TimeZone::UTC);
    (
        i32::from(civil.year()),
        u8::try_from(civil.month()).unwrap_or(1),
        u8::try_from(civil.day()).unwrap_or(1),
    )
}

fn days(now: Timestamp, days: i64) -> Timestamp {
    now.checked_add(SignedDuration::from_hours(24 * days))
        .unwrap_or(now)
}

fn bytes(secret: &Secret, key: &'static str) -> Result<String, CertError> {
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or(CertError::Stored(key))?;
    String::from_utf8(value.0.clone()).map_err(|_| CertError::Stored(key))
}

/// The Secret after `renewal`: a new CA when asked, and a new serving certificate for `dns`.
pub fn issue(
    previous: Option<&Secret>,
    renewal: Renewal,
    dns: &[String],
    namespace: &str,
    name: &str,
    now: Timestamp,
) -> Result<Secret, CertError> {
    let (ca_pem, ca_key, ca_not_after) = match (renewal, previous) {
        (Renewal::All, _) | (_, None) => {
            let key = KeyPair::generate()?;
            let not_after = days(now, CA_VALIDITY_DAYS);
            let certificate = ca_params(not_after)?.self_signed(&key)?;
            (certificate.pem(), key, not_after)
        }
        (_, Some(previous)) => {
            let key = KeyPair::from_pem(&bytes(previous, "ca.key")?)
                .map_err(|_| CertError::Stored("ca.key"))?;
            let not_after = annotation(previous, CA_NOT_AFTER)
                .and_then(|t| t.parse().ok())
                .ok_or(CertError::Stored(CA_NOT_AFTER))?;
            (bytes(previous, "ca.crt")?, key, not_after)
        }
    };
    let issuer = Issuer::new(ca_params(ca_not_after)?, &ca_key);
    let serving_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns.to_vec())?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, dns.first().cloned().unwrap_or_default());
    params.distinguished_name = subject;
    let not_after = days(now, CERT_VALIDITY_DAYS).min(ca_not_after);
    let (year, month, day) = ymd(not_after);
    params.not_after = rcgen::date_time_ymd(year, month, day);
    let certificate = params.signed_by(&serving_key, &issuer)?;
    let data = BTreeMap::from([
        ("ca.crt".to_string(), ByteString(ca_pem.into_bytes())),
        (
            "ca.key".to_string(),
            ByteString(ca_key.serialize_pem().into_bytes()),
        ),
        (
            "tls.crt".to_string(),
            ByteString(certificate.pem().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(serving_key.serialize_pem().into_bytes()),
        ),
    ]);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "coral".to_string(),
            )])),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER.to_string(), not_after.to_string()),
                (CA_NOT_AFTER.to_string(), ca_not_after.to_string()),
                (DNS_NAMES.to_string(), dns.join(",")),
            ])),
            resource_version: previous.and_then(|p| p.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(data),
        ..Secret::default()
    })
}

/// The JSON patch that puts `ca_pem` into every webhook of a (mutating or validating) webhook
/// configuration, or `None` when all have it.
pub fn ca_bundle_patch(configuration: &Value, ca_pem: &str) -> Option<Value> {
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let webhooks = configuration.get("webhooks")?.as_array()?;
    let ops: Vec<Value> = webhooks
        .iter()
        .enumerate()
        .filter(|(_, webhook)| webhook["clientConfig"]["caBundle"].as_str() != Some(bundle.as_str()))
        .flat_map(|(i, webhook)| {
            let name = webhook["name"].clone();
            [
                // Guard against the list changing between read and write.
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}),
                json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}),
            ]
        })
        .collect();
    (!ops.is_empty()).then_some(Value::Array(ops))
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;

    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("time")
    }

    #[test]
    fn controller_certificates_are_issued_kept_and_renewed_before_expiry() {
        let dns = dns_names("coral-webhook", "coral-system");
        assert_eq!(dns[2], "coral-webhook.coral-system.svc");
        assert_eq!(renewal(None, &dns, now()), Renewal::All);
        let secret = issue(
            None,
            Renewal::All,
            &dns,
            "coral-system",
            "coral-webhook-tls",
            now(),
        )
        .expect("issued");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(renewal(Some(&secret), &dns, now()), Renewal::None);
        assert_eq!(
            renewal(Some(&secret), &dns, days(now(), 300)),
            Renewal::None
        );
        assert_eq!(
            renewal(Some(&secret), &dns, days(now(), 340)),
            Renewal::ServingCert,
            "within 30 days of expiry"
        );
        assert_eq!(
            renewal(Some(&secret), &dns[..2], now()),
            Renewal::ServingCert,
            "other names"
        );

        let renewed = issue(
            Some(&secret),
            Renewal::ServingCert,
            &dns,
            "coral-system",
            "coral-webhook-tls",
            days(now(), 340),
        )
        .expect("renewed");
        let data = |s: &Secret, k: &str| s.data.as_ref().and_then(|d| d.get(k)).cloned();
        assert_eq!(
            data(&renewed, "ca.crt"),
            data(&secret, "ca.crt"),
            "the CA is kept"
        );
        assert_ne!(data(&renewed, "tls.crt"), data(&secret, "tls.crt"));
        assert_eq!(
            renewal(Some(&renewed), &dns, days(now(), 340)),
            Renewal::None
        );
        assert_eq!(
            renewal(Some(&renewed), &dns, days(now(), 3640)),
            Renewal::All,
            "the CA nears its end"
        );

        // The served certificate verifies against the CA with the Service's names.
        let ca = data(&renewed, "ca.crt").expect("ca");
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls::pki_types::CertificateDer::pem_slice_iter(&ca.0) {
            roots.add(der.expect("PEM")).expect("a CA");
        }
        let cert = data(&renewed, "tls.crt").expect("cert");
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&cert.0)
            .map(|c| c.expect("PEM"))
            .collect();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .expect("verifier");
        let name = rustls::pki_types::ServerName::try_from("coral-webhook.coral-system.svc")
            .expect("name");
        let verified = verifier.verify_server_cert(
            &chain[0],
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_800_000_000 + 340 * 86_400,
            )),
        );
        assert!(verified.is_ok(), "{verified:?}");
    }

    #[test]
    fn controller_ca_bundle_patch_touches_only_stale_webhooks() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let bundle = base64::engine::general_purpose::STANDARD.encode(ca);
        let configuration = json!({"webhooks": [
            {"name": "mutate.coral.dev", "clientConfig": {"service": {"name": "coral-webhook"}}},
            {"name": "pods.coral.dev", "clientConfig": {"caBundle": bundle}},
        ]});
        assert_eq!(
            ca_bundle_patch(&configuration, ca),
            Some(json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "mutate.coral.dev"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle},
            ]))
        );
        let current = json!({"webhooks": [{"name": "x", "clientConfig": {"caBundle": bundle}}]});
        assert_eq!(ca_bundle_patch(&current, ca), None);
    }
}
