//! The Helm chart (`helm/instance-manager`), linted and rendered by a real `helm` (from
//! `IM_TEST_HELM`, which `make test` installs with scripts/ensure-helm.sh), its manifests
//! parsed and checked: availability, hardening, probes, IRSA, secrets kept out of
//! ConfigMaps, the values schema. The configuration it renders is fed to the real binary
//! (`serve --dump-config`, which validates it), and the metric names its alerts and its
//! dashboard use are compared with what a real server exports on `/metrics`.

mod common;
mod platform;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = "helm/instance-manager";
const FULL_VALUES: &str = "helm/instance-manager/ci/full-values.yaml";
const NAMESPACE: &str = "bbws";
const RELEASE: &str = "im";

/// `$IM_TEST_HELM`, else the project-local install of scripts/ensure-helm.sh.
fn helm_path() -> PathBuf {
    let path = match std::env::var_os("IM_TEST_HELM") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => common::manifest_dir().join(".tools/helm/helm"),
    };
    assert!(
        path.is_file(),
        "{} not found: run `make test` or `bash scripts/ensure-helm.sh` first",
        path.display()
    );
    path
}

fn helm(args: &[&str]) -> Output {
    Command::new(helm_path())
        .args(args)
        .current_dir(common::manifest_dir())
        .output()
        .expect("run helm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm template` of the chart with `extra` arguments (values files, `--set`), as parsed
/// documents; panics if helm fails.
fn render(extra: &[&str]) -> Manifests {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    let output = helm(&args);
    assert!(
        output.status.success(),
        "helm {args:?} failed:\n{}",
        text(&output.stderr)
    );
    let rendered = text(&output.stdout);
    let docs = serde_norway::Deserializer::from_str(&rendered)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{e}\n{rendered}")))
        .filter(|doc| !doc.is_null())
        .collect();
    Manifests { docs }
}

fn render_full() -> Manifests {
    render(&["--values", FULL_VALUES])
}

struct Manifests {
    docs: Vec<Value>,
}

impl Manifests {
    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The one document of `kind`; panics unless there is exactly one.
    fn one(&self, kind: &str) -> &Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "{kind}: {found:#?}");
        found[0]
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    fn container(&self) -> &Value {
        let containers = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1, "{containers:#?}");
        &containers[0]
    }

    /// The service's configuration file as the ConfigMap holds it.
    fn config_toml(&self) -> String {
        let config_maps = self.of_kind("ConfigMap");
        let holder = config_maps
            .iter()
            .find(|c| c["data"]["config.toml"].is_string())
            .expect("a ConfigMap with config.toml");
        holder["data"]["config.toml"].as_str().unwrap().to_owned()
    }

    fn config(&self) -> toml::Table {
        let text = self.config_toml();
        toml::from_str(&text).unwrap_or_else(|e| panic!("config.toml is not TOML: {e}\n{text}"))
    }

    /// Decoded values of every Secret the chart renders.
    fn secret_values(&self) -> Vec<String> {
        use base64::Engine;
        self.of_kind("Secret")
            .iter()
            .flat_map(|s| s["data"].as_object().into_iter().flatten())
            .map(|(_, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                String::from_utf8(bytes).unwrap()
            })
            .collect()
    }
}

/// The element of the array `list` that `matches`; panics (naming `what`) if none does.
fn find<'a>(list: &'a Value, what: &str, matches: impl Fn(&Value) -> bool) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("{what}: not a list: {list:#?}"))
        .iter()
        .find(|item| matches(item))
        .unwrap_or_else(|| panic!("no {what} in {list:#?}"))
}

fn port_named(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port {name}: {container:#?}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_chart_lints_strictly_with_default_and_full_values() {
    for extra in [&[][..], &["--values", FULL_VALUES][..]] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(extra);
        let output = helm(&args);
        assert!(
            output.status.success(),
            "helm {args:?}:\n{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        assert!(
            text(&output.stdout).contains("0 chart(s) failed"),
            "{}",
            text(&output.stdout)
        );
    }
}

#[test]
fn default_values_render_a_hardened_highly_available_deployment() {
    let manifests = render(&[]);
    assert_eq!(
        manifests.kinds(),
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceAccount"
        ]
        .map(str::to_owned)
        .into(),
        "optional parts are off by default"
    );
    for doc in &manifests.docs {
        let labels = &doc["metadata"]["labels"];
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ] {
            assert!(labels[key].is_string(), "{key} on {doc:#?}");
        }
    }
    let deployment = manifests.one("Deployment");
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2, "{spec:#?}");
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    let pod = &spec["template"]["spec"];
    let topology: BTreeSet<&str> = pod["topologySpreadConstraints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["topologyKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        topology,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"].into()
    );
    let selector = &spec["selector"]["matchLabels"];
    for constraint in pod["topologySpreadConstraints"].as_array().unwrap() {
        assert_eq!(&constraint["labelSelector"]["matchLabels"], selector);
    }
    let pdb = manifests.one("PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Hardening, on the pod and on the container.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = manifests.container();
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{security:#?}");
    assert_eq!(security["runAsUser"], 10001);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    // The only writable place is an emptyDir on /tmp.
    let tmp = find(&container["volumeMounts"], "/tmp", |m| {
        m["mountPath"] == "/tmp"
    });
    let volume = find(&pod["volumes"], "the /tmp volume", |v| {
        v["name"] == tmp["name"]
    });
    assert!(volume["emptyDir"].is_object(), "{volume:#?}");

    // Native gRPC probes on the port the server listens on and the Service exposes.
    let grpc = port_named(container, "grpc");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_u64(),
            Some(grpc),
            "{probe}: {container:#?}"
        );
    }
    let config = manifests.config();
    assert_eq!(
        config["listen"].as_str(),
        Some(format!("0.0.0.0:{grpc}").as_str())
    );
    let metrics = port_named(container, "metrics");
    assert_eq!(
        config["metrics_listen"].as_str(),
        Some(format!("0.0.0.0:{metrics}").as_str())
    );
    let service = manifests.one("Service");
    let service_ports: BTreeMap<&str, (u64, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                (
                    p["port"].as_u64().unwrap(),
                    p["targetPort"].as_str().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        service_ports,
        [("grpc", (grpc, "grpc")), ("metrics", (metrics, "metrics"))].into()
    );
    assert_eq!(&service["spec"]["selector"], selector);

    // A changed configuration rolls the pods.
    let checksum = |manifests: &Manifests| {
        manifests.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(checksum(&manifests).len(), 64);
    assert_eq!(checksum(&render(&[])), checksum(&manifests));
    assert_ne!(
        checksum(&render(&["--set", "config.workers=4"])),
        checksum(&manifests)
    );
    // The ServiceAccount has no role until one is given.
    assert!(
        manifests.one("ServiceAccount")["metadata"]["annotations"].is_null(),
        "{:#?}",
        manifests.one("ServiceAccount")
    );
    assert_eq!(
        pod["serviceAccountName"],
        manifests.one("ServiceAccount")["metadata"]["name"]
    );
}

#[test]
fn full_values_render_every_optional_part() {
    let manifests = render_full();
    for kind in [
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    ] {
        manifests.one(kind);
    }
    // IRSA: the role is the ServiceAccount's annotation, and the pods run as that account.
    let account = manifests.one("ServiceAccount");
    assert_eq!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/instance-manager"
    );
    let deployment = manifests.one("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    // The autoscaler owns the replica count.
    assert!(deployment["spec"]["replicas"].is_null(), "{deployment:#?}");
    let hpa = manifests.one("HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let container = manifests.container();
    assert_eq!(
        container["image"],
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/instance-manager:1.2.3"
    );
    assert_eq!(container["imagePullPolicy"], "Always");

    // TLS: the Secret is mounted as a directory (renewals reach the files), the config
    // names its files, and the probes fall back to TCP (Kubernetes' gRPC probe has no TLS).
    let tls_volume = find(&pod["volumes"], "the TLS volume", |v| {
        v["secret"]["secretName"] == "instance-manager-tls"
    });
    let mount = find(&container["volumeMounts"], "the TLS mount", |m| {
        m["name"] == tls_volume["name"]
    });
    assert!(mount["subPath"].is_null(), "{mount:#?}");
    let dir = mount["mountPath"].as_str().unwrap();
    let config = manifests.config();
    let tls = config["tls"].as_table().unwrap();
    assert_eq!(tls["cert_file"].as_str(), Some(&*format!("{dir}/tls.crt")));
    assert_eq!(tls["key_file"].as_str(), Some(&*format!("{dir}/tls.key")));
    assert_eq!(
        tls["client_ca_file"].as_str(),
        Some(&*format!("{dir}/ca.crt"))
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(container[probe]["grpc"].is_null(), "{probe}");
        assert_eq!(container[probe]["tcpSocket"]["port"], "grpc", "{probe}");
    }
    // Authentication: token hashes and the JWT settings.
    let auth = config["auth"].as_table().unwrap();
    assert_eq!(auth["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(auth["jwt"]["audience"].as_str(), Some("4v8k2example"));
    assert!(auth["jwt"].get("enabled").is_none());
    // Tracing only when enabled, under the keys of [tracing].
    assert_eq!(
        config["tracing"]["otlp_endpoint"].as_str(),
        Some("http://otel-collector.observability:4317")
    );
    assert_eq!(config["tracing"]["sample_ratio"].as_float(), Some(0.25));
    assert!(render(&[]).config().get("tracing").is_none());
    let whole_ratio = render(&["--values", FULL_VALUES, "--set", "tracing.sampleRatio=1"]).config();
    assert_eq!(whole_ratio["tracing"]["sample_ratio"].as_float(), Some(1.0));

    // Metrics: the ServiceMonitor scrapes the Service's metrics port.
    let monitor = manifests.one("ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let dashboard = manifests
        .of_kind("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json = dashboard["data"]["instance-manager.json"].as_str().unwrap();
    let dashboard: Value = serde_json::from_str(json).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 8);
    let alerts: BTreeSet<String> = alert_rules(&manifests)
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        alerts,
        [
            "ImLoadBalancerPoolNearlyFull",
            "ImNoReplica",
            "ImNoReplicaClaiming",
            "ImOperationFailureRatio",
            "ImOperationStuck",
            "ImOperationWaitingTooLong",
            "ImOperationsPendingTooLong"
        ]
        .map(str::to_owned)
        .into()
    );
    // The page token key comes from the named Secret; the chart makes none then.
    assert!(manifests.of_kind("Secret").is_empty());
    let env = env_of(container);
    assert_eq!(
        env["IM_PAGE_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "instance-manager-secrets", "key": "page-token"})
    );
    assert_eq!(
        env["IM_EXTERNAL_ID_PROD"]["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "instance-manager-secrets", "key": "prod-external-id"})
    );
    assert!(!env.contains_key("IM_EXTERNAL_ID_DEV"), "{env:#?}");
}

#[test]
fn no_secret_reaches_a_config_map() {
    // The chart's own Secret (a random key) and the full values.
    for manifests in [render(&[]), render_full()] {
        let config_maps: Vec<String> = manifests
            .of_kind("ConfigMap")
            .iter()
            .map(|c| c["data"].to_string())
            .collect();
        for secret in manifests.secret_values() {
            assert!(secret.len() >= 32, "a weak key");
            for config_map in &config_maps {
                assert!(!config_map.contains(&secret), "{config_map}");
            }
        }
        let config = manifests.config();
        assert!(config.get("page_token_secret").is_none());
        for environment in config
            .get("environments")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
        {
            assert!(environment.get("external_id").is_none(), "{environment}");
        }
        let env = env_of(manifests.container());
        assert!(
            env["IM_PAGE_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"].is_object(),
            "{env:#?}"
        );
    }
    // The chart keeps one key across renders only through the cluster (lookup); a render
    // without one makes a new key each time, and never the same as another release's.
    assert_ne!(render(&[]).secret_values(), render(&[]).secret_values());
    // Secrets cannot be put into the configuration through values.
    for set in [
        "config.page_token_secret=hunter2",
        "config.environments[0].name=DEV,config.environments[0].account_id=111122223333,config.environments[0].region=eu-west-1,config.environments[0].external_id=hunter2",
    ] {
        let output = helm(&["template", RELEASE, CHART, "--set", set]);
        assert!(!output.status.success(), "{set} was accepted");
        let stderr = text(&output.stderr);
        assert!(stderr.contains("additional properties"), "{set}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

#[test]
fn the_schema_rejects_bad_values() {
    for (set, field) in [
        ("replicaCount=abc", "replicaCount"),
        ("replicaCount=0", "replicaCount"),
        ("unknownValue=1", "unknownValue"),
        ("config.workers=0", "workers"),
        ("config.log_format=xml", "log_format"),
        ("config.tabel=typo", "tabel"),
        ("serviceAccount.roleArn=not-an-arn", "roleArn"),
        (
            "auth.tokens[0].name=ci,auth.tokens[0].role=root,auth.tokens[0].sha256=00",
            "role",
        ),
    ] {
        let output = helm(&["template", RELEASE, CHART, "--set", set]);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{set} was accepted");
        assert!(stderr.contains("schema"), "{set}: {stderr}");
        assert!(stderr.contains(field), "{set}: {stderr}");
    }
    // The same values, well formed, pass.
    for set in [
        "replicaCount=3",
        "config.workers=4",
        "config.log_format=human",
        "serviceAccount.roleArn=arn:aws:iam::123456789012:role/x",
    ] {
        let output = helm(&["template", RELEASE, CHART, "--set", set]);
        assert!(output.status.success(), "{set}: {}", text(&output.stderr));
    }
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

/// What the container's environment would be, as far as the configuration goes: plain
/// values as they are, Secret references from the rendered Secrets (or a test value for a
/// Secret the chart does not make), the pod's name for `metadata.name`.
fn container_env(manifests: &Manifests) -> Vec<(String, String)> {
    use base64::Engine;
    env_of(manifests.container())
        .into_iter()
        .map(|(name, entry)| {
            let value = if let Some(value) = entry["value"].as_str() {
                value.to_owned()
            } else if let Some(reference) = entry["valueFrom"]["secretKeyRef"].as_object() {
                manifests
                    .of_kind("Secret")
                    .iter()
                    .find(|s| s["metadata"]["name"] == reference["name"])
                    .map(|s| {
                        let encoded = s["data"][reference["key"].as_str().unwrap()]
                            .as_str()
                            .unwrap();
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(encoded)
                            .unwrap();
                        String::from_utf8(bytes).unwrap()
                    })
                    .unwrap_or_else(|| "a-secret-from-the-cluster".to_owned())
            } else if entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                "im-instance-manager-7d9c5-x2x4q".to_owned()
            } else {
                panic!("unexpected env entry {entry:#?}")
            };
            (name, value)
        })
        .collect()
}

/// Runs the container's command line from the Deployment with `--dump-config`, its
/// configuration file being the ConfigMap's config.toml written to `dir`.
fn dump_config(manifests: &Manifests, dir: &Path) -> common::RunOutput {
    let container = manifests.container();
    let mounted = find(&container["volumeMounts"], "config.toml's mount", |m| {
        m["subPath"] == "config.toml"
    })["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = dir.join("config.toml");
    std::fs::write(&path, manifests.config_toml()).unwrap();
    let mut args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let arg = a.as_str().unwrap();
            if arg == mounted {
                path.to_str().unwrap().to_owned()
            } else {
                arg.to_owned()
            }
        })
        .collect();
    assert!(
        args.contains(&path.to_str().unwrap().to_owned()),
        "{args:?}"
    );
    args.push("--dump-config".into());
    let env = container_env(manifests);
    let mut envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The harness serves without authentication unless told otherwise: the chart's own
    // [auth] must be what the binary reads.
    envs.push(("IM_AUTH_DISABLED", "false"));
    common::ServerProcess::run(&args, &envs, Duration::from_secs(30))
}

#[test]
fn the_rendered_configuration_is_accepted_by_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = dump_config(&render(&[]), dir.path());
    defaults.assert_success();
    let dumped: toml::Table = toml::from_str(&defaults.stdout).unwrap();
    assert_eq!(dumped["listen"].as_str(), Some("0.0.0.0:50051"));
    assert_eq!(dumped["metrics_listen"].as_str(), Some("0.0.0.0:9090"));
    assert_eq!(dumped["log_format"].as_str(), Some("json"));
    // The environment reached the binary: the Secret's key (shown redacted) and the pod's
    // name as the replica id.
    assert_eq!(dumped["page_token_secret"].as_str(), Some("<redacted>"));
    assert_eq!(
        dumped["replica_id"].as_str(),
        Some("im-instance-manager-7d9c5-x2x4q")
    );
    assert_eq!(dumped["auth"]["disabled"].as_bool(), Some(false));

    // Every key of the binary's configuration is a value of the chart, or set by it.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(
            common::manifest_dir()
                .join(CHART)
                .join("values.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let config_keys: BTreeSet<&str> = schema["properties"]["config"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let set_by_the_chart = [
        "listen",
        "metrics_listen",
        "page_token_secret",
        "replica_id",
        "auth",
        "tls",
        "tracing",
        // Test-only faults: never in a deployment.
        "failpoints",
    ];
    for key in dumped.keys() {
        assert!(
            config_keys.contains(key.as_str()) || set_by_the_chart.contains(&key.as_str()),
            "the configuration key {key} is not a value of the chart (values.schema.json)"
        );
    }
    for key in &config_keys {
        assert!(
            dumped.contains_key(*key) || ["aws_endpoint", "aws_region"].contains(key),
            "values.schema.json names {key}, which the binary does not know"
        );
    }

    let full = render_full();
    let accepted = dump_config(&full, dir.path());
    accepted.assert_success();
    let dumped: toml::Table = toml::from_str(&accepted.stdout).unwrap();
    assert_eq!(dumped["table"].as_str(), Some("bbws-instance-manager"));
    assert_eq!(dumped["workers"].as_integer(), Some(20));
    assert_eq!(dumped["scale_bounds"]["max"].as_integer(), Some(12));
    assert_eq!(dumped["auth"]["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(dumped["auth"]["jwt"]["leeway_secs"].as_integer(), Some(60));
    assert_eq!(
        dumped["tls"]["client_ca_file"].as_str(),
        Some("/etc/instance-manager/tls/ca.crt")
    );
    let environments = dumped["environments"].as_array().unwrap();
    assert_eq!(environments.len(), 2);
    // PROD's ExternalId came from its Secret through IM_EXTERNAL_ID_PROD; DEV has none.
    let external_ids: Vec<&str> = environments
        .iter()
        .map(|e| e["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(external_ids, ["<redacted>", ""]);
    assert_eq!(
        environments[0]["platform"]["subnets"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(environments[0]["scale_bounds"]["min"].as_integer(), Some(3));
    let platform_keys: BTreeSet<&str> = schema["properties"]["config"]["properties"]
        ["environments"]["items"]["properties"]["platform"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in environments[0]["platform"].as_table().unwrap().keys() {
        assert!(
            platform_keys.contains(key.as_str()),
            "the platform key {key} is not a value of the chart"
        );
    }

    // A configuration the binary refuses fails the same check (the check can fail).
    let refused = dump_config(
        &render(&["--set", "config.stuck_after_secs=10"]),
        dir.path(),
    );
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("stuck_after_secs"),
        "{}",
        refused.stderr
    );
}

fn alert_rules(manifests: &Manifests) -> Vec<Value> {
    manifests.one("PrometheusRule")["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// Every `im_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|token| token.starts_with("im_"))
        .map(str::to_owned)
        .collect()
}

/// Whether a scrape exports `name`: a sample of it, or of the histogram it is a
/// `_bucket`/`_sum`/`_count` of.
fn exported(scrape: &str, name: &str) -> bool {
    let sampled = |n: &str| {
        scrape.lines().any(|l| {
            l.strip_prefix(n)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
    };
    let histogram = |base: &str| scrape.contains(&format!("# TYPE {base} histogram\n"));
    sampled(name)
        || histogram(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(histogram))
}

#[tokio::test]
async fn alerts_and_dashboard_name_metrics_the_binary_exports() {
    let manifests = render_full();
    let rules = alert_rules(&manifests);
    let mut alerted = BTreeSet::new();
    for rule in &rules {
        let names = metric_names(rule["expr"].as_str().unwrap());
        assert!(!names.is_empty(), "{rule:#?}");
        alerted.extend(names);
    }
    let json = manifests
        .of_kind("ConfigMap")
        .into_iter()
        .find_map(|c| c["data"]["instance-manager.json"].as_str())
        .unwrap()
        .to_owned();
    let dashboard: Value = serde_json::from_str(&json).unwrap();
    let mut charted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            charted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }

    // A real server whose families all have series: an operation claimed, ended STUCK by
    // its deadline (the first step pauses), and the RPC that created it.
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.metrics_listen = Some(common::ANY_PORT.parse().unwrap());
    config.provision_deadline_secs = 1;
    let dir = tempfile::tempdir().unwrap();
    let path = platform::write_config(&config, dir.path(), 30);
    let (mut server, addr) = platform::serve_process(&path, "access_point=pause");
    let metrics = server.wait_logged_address("serving metrics");
    let mut client = platform::Client::connect(&addr).await;
    let operation = client
        .create(&platform::tenant("alerted"), v1::Environment::Dev)
        .await;
    let (events, done) = client.watch(&operation.name).await;
    assert_eq!(
        platform::metadata(&done).status(),
        v1::OperationStatus::Stuck,
        "{events:#?}"
    );
    // The ending is counted after its write, which the watch may see first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let scraped = loop {
        let (_, scraped) = common::scrape_metrics(metrics).await;
        // The reconciler's gauges come with its first pass, at start-up.
        if exported(&scraped, "im_operations_stuck_total")
            && exported(&scraped, "im_operations_waiting_oldest_seconds")
            && exported(&scraped, "im_load_balancer_quota")
        {
            break scraped;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no STUCK counted:\n{scraped}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in &alerted {
        assert!(
            exported(&scraped, name),
            "the alert rules use {name}, which the server does not export:\n{scraped}"
        );
    }
    assert!(
        alerted.len() >= 5,
        "{alerted:?}: stuck, finished, running, workers, claimed, RPCs"
    );
    // The dashboard also charts counters that only exist once their event happened (orphans
    // removed, backups swept, …): each is exported here or registered in src/metrics.rs.
    let registered =
        std::fs::read_to_string(common::manifest_dir().join("src/metrics.rs")).unwrap();
    for name in &charted {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            exported(&scraped, name) || registered.contains(&format!("\"{base}\"")),
            "the dashboard charts {name}, which the server neither exports nor registers"
        );
    }
    // And the check itself can fail.
    assert!(!exported(&scraped, "im_operations_pending"));
    assert!(!exported(&scraped, "im_operations_stuck"));
}
