//! `netpolctl registry import`: turn the JSON of
//! `kubectl get pods,namespaces -A -o json` into registry files (the format of
//! docs/policy.md, "The registry").
//!
//! netpol itself never talks to an API server; this is a one-shot conversion an
//! operator runs where kubectl works, then copies the files to every host.
//! `netpolctl registry push` (fleet mode, in [`super::fleet`]) writes a
//! registry directory to etcd instead.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::text::count;

#[derive(Debug, Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Convert `kubectl get pods,namespaces -A -o json` into registry files
    #[command(
        after_help = "Examples:\n  kubectl get pods,namespaces -A -o json > cluster.json\n  netpolctl registry import cluster.json --out /etc/netpol/endpoints.d\n  kubectl get pods,namespaces -A -o json | netpolctl registry import - > registry.yaml"
    )]
    Import(ImportArgs),
    /// Write DIR's registry documents to etcd (fleet mode), each under its key
    Push(super::fleet::RegistryPushArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The kubectl JSON ("-" for standard input)
    #[arg(value_name = "FILE", default_value = "-")]
    pub input: PathBuf,
    /// Write one file per Kubernetes namespace into DIR (k8s-<namespace>.yaml)
    /// instead of printing one multi-document YAML stream
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(args: &RegistryArgs) -> anyhow::Result<i32> {
    match &args.command {
        RegistryCommand::Import(a) => import(a),
        RegistryCommand::Push(a) => super::fleet::registry_push(a),
    }
}

// ---- kubectl's JSON, only the fields we read -------------------------------------

#[derive(Debug, Deserialize)]
struct KList {
    #[serde(default)]
    items: Vec<KObject>,
}

#[derive(Debug, Deserialize)]
struct KObject {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: KMeta,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    status: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
struct KMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

// ---- registry documents we write --------------------------------------------------

#[derive(Debug, Serialize)]
struct Doc {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Meta,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<EndpointSpec>,
}

#[derive(Debug, Serialize)]
struct Meta {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct EndpointSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    interface: &'static str,
    addresses: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<NamedPort>,
}

#[derive(Debug, Serialize)]
struct NamedPort {
    name: String,
    port: u16,
    protocol: String,
}

/// The result of a conversion: documents per namespace and notes for skipped pods.
#[derive(Debug, Default)]
pub struct Converted {
    /// namespace → YAML stream of its Namespace document and Endpoints.
    pub files: BTreeMap<String, String>,
    pub endpoints: usize,
    pub namespaces: usize,
    pub notes: Vec<String>,
}

/// Convert kubectl JSON text. Pure; `source` is only used in messages.
pub fn convert(source: &str, text: &str) -> anyhow::Result<Converted> {
    let list: KList = serde_json::from_str(text).with_context(|| {
        format!("{source}: not the JSON of `kubectl get pods,namespaces -A -o json`")
    })?;
    let mut docs: BTreeMap<String, Vec<Doc>> = BTreeMap::new();
    let mut out = Converted::default();
    for (i, item) in list.items.iter().enumerate() {
        match item.kind.as_str() {
            "Namespace" => {
                docs.entry(item.metadata.name.clone()).or_default().insert(
                    0,
                    Doc {
                        api_version: "netpol/v1",
                        kind: "Namespace",
                        metadata: Meta {
                            name: item.metadata.name.clone(),
                            namespace: None,
                            labels: item.metadata.labels.clone(),
                        },
                        spec: None,
                    },
                );
                out.namespaces += 1;
            }
            "Pod" => {
                let ns = item
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let who = format!("pod {ns}/{}", item.metadata.name);
                if item.metadata.name.is_empty() {
                    bail!("{source}: items[{i}]: a Pod without metadata.name");
                }
                if item.spec.get("hostNetwork").and_then(|v| v.as_bool()) == Some(true) {
                    out.notes.push(format!(
                        "{who}: skipped: it uses the host's network (its traffic is the host's)"
                    ));
                    continue;
                }
                let mut addresses: Vec<String> = item
                    .status
                    .get("podIPs")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| {
                                x.get("ip").and_then(|ip| ip.as_str()).map(str::to_owned)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if addresses.is_empty() {
                    if let Some(ip) = item.status.get("podIP").and_then(|v| v.as_str()) {
                        addresses.push(ip.to_owned());
                    }
                }
                for a in &addresses {
                    if a.parse::<std::net::IpAddr>().is_err() {
                        bail!("{source}: items[{i}] ({who}): status.podIPs: {a:?} is not an IP address");
                    }
                }
                if addresses.is_empty() {
                    out.notes.push(format!(
                        "{who}: skipped: it has no IP address yet (status.podIPs is empty)"
                    ));
                    continue;
                }
                let node = item
                    .spec
                    .get("nodeName")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                let mut ports = Vec::new();
                if let Some(containers) = item.spec.get("containers").and_then(|v| v.as_array()) {
                    for c in containers {
                        for p in c
                            .get("ports")
                            .and_then(|v| v.as_array())
                            .into_iter()
                            .flatten()
                        {
                            let (Some(name), Some(port)) = (
                                p.get("name").and_then(|v| v.as_str()),
                                p.get("containerPort").and_then(|v| v.as_u64()),
                            ) else {
                                continue;
                            };
                            let Ok(port) = u16::try_from(port) else {
                                continue;
                            };
                            let protocol = p
                                .get("protocol")
                                .and_then(|v| v.as_str())
                                .unwrap_or("TCP")
                                .to_owned();
                            ports.push(NamedPort {
                                name: name.to_owned(),
                                port,
                                protocol,
                            });
                        }
                    }
                }
                docs.entry(ns.clone()).or_default().push(Doc {
                    api_version: "netpol/v1",
                    kind: "Endpoint",
                    metadata: Meta {
                        name: item.metadata.name.clone(),
                        namespace: Some(ns),
                        labels: item.metadata.labels.clone(),
                    },
                    spec: Some(EndpointSpec {
                        node,
                        interface: "auto",
                        addresses,
                        ports,
                    }),
                });
                out.endpoints += 1;
            }
            "" => bail!("{source}: items[{i}]: an item without kind"),
            other => out.notes.push(format!(
                "items[{i}]: {other} {}: skipped: only Pods and Namespaces are read",
                item.metadata.name
            )),
        }
    }
    for (ns, list) in docs {
        let mut text = format!(
            "# Generated by `netpolctl registry import` from {source}: Kubernetes namespace {ns}.\n"
        );
        for d in &list {
            text.push_str("---\n");
            text.push_str(&serde_norway::to_string(d).context("serializing a registry document")?);
        }
        out.files.insert(ns, text);
    }
    Ok(out)
}

fn import(args: &ImportArgs) -> anyhow::Result<i32> {
    let (source, text) = if args.input == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        ("<stdin>".to_owned(), s)
    } else {
        let s = std::fs::read_to_string(&args.input)
            .with_context(|| format!("{}", args.input.display()))?;
        (args.input.display().to_string(), s)
    };
    let conv = convert(&source, &text)?;
    for n in &conv.notes {
        eprintln!("note: {n}");
    }
    match &args.out {
        None => {
            for t in conv.files.values() {
                print!("{t}");
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            for (ns, t) in &conv.files {
                let path = dir.join(format!("k8s-{ns}.yaml"));
                let tmp = dir.join(format!(".k8s-{ns}.yaml.tmp"));
                std::fs::write(&tmp, t).with_context(|| format!("{}", tmp.display()))?;
                std::fs::rename(&tmp, &path).with_context(|| format!("{}", path.display()))?;
            }
            eprintln!(
                "wrote {} and {} into {} in {}",
                count(conv.endpoints, "endpoint", "endpoints"),
                count(conv.namespaces, "namespace", "namespaces"),
                count(conv.files.len(), "file", "files"),
                dir.display()
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/kubectl/kind-cluster.json");

    #[test]
    fn converts_pods_and_namespaces_and_skips_host_network() {
        let c = convert("kind-cluster.json", FIXTURE).unwrap();
        assert_eq!(c.namespaces, 3);
        assert_eq!(c.endpoints, 5);
        assert_eq!(
            c.files.keys().collect::<Vec<_>>(),
            ["default", "kube-system", "prod"]
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("kube-system/kindnet-uvwxy") && n.contains("host's network")),
            "{:?}",
            c.notes
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("default/pending-job") && n.contains("no IP address")),
            "{:?}",
            c.notes
        );
        let prod = &c.files["prod"];
        // The Namespace document comes first, with its labels.
        let first_doc = prod.split("---\n").nth(1).unwrap();
        assert!(
            first_doc.contains("kind: Namespace") && first_doc.contains("team: payments"),
            "{prod}"
        );
        assert!(prod.contains("name: backend-5f6b7-klmno"));
        assert!(prod.contains("node: kind-worker"));
        assert!(prod.contains("interface: auto"));
        assert!(prod.contains("fd00:10:244:1::21"));
        assert!(prod.contains("name: http"));
    }

    #[test]
    fn rejects_what_is_not_kubectl_json() {
        let e = convert("x.json", "{\"items\": 3}").unwrap_err();
        assert!(
            format!("{e:#}")
                .starts_with("x.json: not the JSON of `kubectl get pods,namespaces -A -o json`"),
            "{e:#}"
        );
        let e = convert("x.json", r#"{"items":[{"kind":"Pod","metadata":{"name":"p"},"status":{"podIPs":[{"ip":"10.0.0.300"}]}}]}"#).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "x.json: items[0] (pod default/p): status.podIPs: \"10.0.0.300\" is not an IP address"
        );
    }
}
