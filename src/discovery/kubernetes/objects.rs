//! Watched objects reduced to what decides whether they are servers: a pod's phase, readiness,
//! IP and port; an EndpointSlice's endpoints and their conditions; a SparkApplication's driver
//! pod name; a SparkConnect's reported server IP and state.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::DynamicObject;

use crate::config::PortRef;
use crate::discovery::Discovered;

/// A watched object reduced to what decides whether it is a server.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Object {
    Pod(PodInfo),
    Slice(SliceInfo),
    App(AppInfo),
    Connect(ConnectInfo),
}

impl Object {
    /// `namespace/name`: the object's key in a store.
    pub(super) fn key(&self) -> String {
        let (ns, name) = match self {
            Object::Pod(p) => (&p.namespace, &p.name),
            Object::Slice(s) => (&s.namespace, &s.name),
            Object::App(a) => (&a.namespace, &a.name),
            Object::Connect(c) => (&c.namespace, &c.name),
        };
        format!("{ns}/{name}")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct PodInfo {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) ip: Option<IpAddr>,
    pub(super) running: bool,
    pub(super) ready: bool,
    pub(super) terminating: bool,
    /// The Spark Connect port, or why the pod has none.
    pub(super) port: Result<u16, String>,
}

impl PodInfo {
    pub(super) fn from_pod(p: &Pod, port: &PortRef) -> Self {
        let status = p.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let port = match port {
            PortRef::Number(n) => Ok(*n),
            PortRef::Name(name) => p
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| cp.name.as_deref() == Some(name))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("no container port named \"{name}\"")),
        };
        PodInfo {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
            ready,
            terminating: p.metadata.deletion_timestamp.is_some(),
            port,
        }
    }

    /// The pod as a server named `name`: Running and Ready with an IP; terminating ones
    /// drain (when they were serving: Ready, or already a server).
    pub(super) fn server(&self, name: String, known: impl Fn(&str) -> bool) -> Option<Discovered> {
        let ip = self.ip?;
        let port = self.port.as_ref().ok()?;
        if !self.running {
            return None;
        }
        let draining = self.terminating;
        let serving = self.ready || (draining && known(&self.uid));
        if !serving {
            return None;
        }
        Some(Discovered {
            name,
            uid: self.uid.clone(),
            addr: SocketAddr::new(ip, *port),
            draining,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct SliceInfo {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) endpoints: Vec<EndpointInfo>,
    pub(super) port: Result<u16, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct EndpointInfo {
    pub(super) ip: IpAddr,
    /// The pod behind it (`targetRef`), when there is one.
    pub(super) target: Option<(String, String)>,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
}

impl SliceInfo {
    pub(super) fn from_slice(s: &EndpointSlice, port: &PortRef) -> Self {
        let ports = s.ports.iter().flatten();
        let port = match port {
            PortRef::Number(n) => Ok(*n),
            PortRef::Name(name) => ports
                .clone()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("no port named \"{name}\"")),
        };
        let endpoints = s
            .endpoints
            .iter()
            .filter_map(|e| {
                let ip = e.addresses.first()?.parse().ok()?;
                let c = e.conditions.as_ref();
                // Unset conditions: ready unless said otherwise; serving follows ready.
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let target = e.target_ref.as_ref().and_then(|t| {
                    Some((t.uid.clone().filter(|u| !u.is_empty())?, t.name.clone()?))
                });
                Some(EndpointInfo {
                    ip,
                    target,
                    ready,
                    serving,
                    terminating,
                })
            })
            .collect();
        SliceInfo {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
            uid: s.uid().unwrap_or_default(),
            endpoints,
            port,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct AppInfo {
    pub(super) namespace: String,
    pub(super) name: String,
    /// Its driver pod's name.
    pub(super) driver: String,
    pub(super) terminating: bool,
}

impl AppInfo {
    pub(super) fn from_object(o: &DynamicObject) -> Self {
        let name = o.name_any();
        let str_at = |path: &[&str]| {
            let mut v = &o.data;
            for p in path {
                v = v.get(p)?;
            }
            v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
        };
        let driver = str_at(&["spec", "driver", "podName"])
            .or_else(|| str_at(&["status", "driverInfo", "podName"]))
            .unwrap_or_else(|| format!("{name}-driver"));
        AppInfo {
            namespace: o.namespace().unwrap_or_default(),
            driver,
            terminating: o.metadata.deletion_timestamp.is_some(),
            name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ConnectInfo {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) ip: Option<IpAddr>,
    pub(super) pod: Option<String>,
    pub(super) ready: bool,
    pub(super) terminating: bool,
}

impl ConnectInfo {
    pub(super) fn from_object(o: &DynamicObject) -> Self {
        let status = o.data.get("status");
        let server = status.and_then(|s| s.get("server"));
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
        ConnectInfo {
            namespace: o.namespace().unwrap_or_default(),
            name: o.name_any(),
            uid: o.uid().unwrap_or_default(),
            ip: text(server.and_then(|s| s.get("podIp"))).and_then(|ip| ip.parse().ok()),
            pod: text(server.and_then(|s| s.get("podName"))).filter(|p| !p.is_empty()),
            ready: text(status.and_then(|s| s.get("state")))
                .is_some_and(|s| s.eq_ignore_ascii_case("ready")),
            terminating: o.metadata.deletion_timestamp.is_some(),
        }
    }
}
