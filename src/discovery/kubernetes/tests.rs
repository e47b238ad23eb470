//! The view's rules without an API server: which objects are servers, and what is handed over
//! when (a `Reset` after each complete list only, single changes in between).

use kube::runtime::watcher::Event;

use super::describe;
use super::objects::{AppInfo, ConnectInfo, EndpointInfo, Object, PodInfo, SliceInfo};
use super::view::{Change, Step, View};
use crate::config::selector::check_selector;
use crate::config::{KubernetesDiscovery, KubernetesKind, PortRef};
use crate::discovery::{Discovered, Update};

fn settings(kind: KubernetesKind, namespaces: &[&str]) -> KubernetesDiscovery {
    KubernetesDiscovery {
        kind,
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        selector: None,
        port: PortRef::Number(15002),
        kubeconfig: None,
    }
}

fn pod(name: &str, ip: Option<&str>, ready: bool, terminating: bool) -> Object {
    Object::Pod(PodInfo {
        namespace: "spark".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        ip: ip.map(|i| i.parse().unwrap()),
        running: true,
        ready,
        terminating,
        port: Ok(15002),
    })
}

fn server(name: &str, ip: &str, draining: bool) -> Discovered {
    Discovered {
        name: name.into(),
        uid: format!("uid-{name}"),
        addr: format!("{ip}:15002").parse().unwrap(),
        draining,
    }
}

/// Lists `objects` as watch `i`'s initial list.
fn list(view: &mut View, i: usize, objects: Vec<Object>) -> Option<Change> {
    assert_eq!(view.event(i, Event::Init), None);
    for o in objects {
        assert_eq!(view.event(i, Event::InitApply(o)), None);
    }
    view.event(i, Event::InitDone)
}

#[test]
fn pods_are_servers_when_running_ready_and_addressed() {
    let mut v = View::new(&settings(KubernetesKind::Pods, &["spark"]), 1);
    let c = list(
        &mut v,
        0,
        vec![
            pod("a", Some("10.0.0.1"), true, false),
            pod("b", Some("10.0.0.2"), false, false),
            pod("c", None, true, false),
        ],
    )
    .unwrap();
    assert_eq!(
        c.reset,
        Some(Update::Reset(vec![server("a", "10.0.0.1", false)]))
    );
    assert!(c.updates.is_empty());
    // b becomes ready: one Upsert, no Reset.
    let c = v
        .event(0, Event::Apply(pod("b", Some("10.0.0.2"), true, false)))
        .unwrap();
    assert_eq!(c.reset, None);
    assert_eq!(
        c.updates,
        vec![Update::Upsert(server("b", "10.0.0.2", false))]
    );
    // a terminates: DRAIN; then it is deleted: removed.
    let c = v
        .event(0, Event::Apply(pod("a", Some("10.0.0.1"), false, true)))
        .unwrap();
    assert_eq!(
        c.updates,
        vec![Update::Upsert(server("a", "10.0.0.1", true))]
    );
    assert!(c.log[0].contains("DRAIN"), "{:?}", c.log);
    let c = v
        .event(0, Event::Delete(pod("a", Some("10.0.0.1"), false, true)))
        .unwrap();
    assert_eq!(c.updates, vec![Update::Remove("uid-a".into())]);
    // b goes not ready: removed. An event that changes nothing hands nothing over.
    let c = v
        .event(0, Event::Apply(pod("b", Some("10.0.0.2"), false, false)))
        .unwrap();
    assert_eq!(c.updates, vec![Update::Remove("uid-b".into())]);
    assert_eq!(
        v.event(0, Event::Apply(pod("b", Some("10.0.0.2"), false, false))),
        None
    );
}

#[test]
fn a_relist_is_one_reset_and_nothing_before_it_completes() {
    let mut v = View::new(&settings(KubernetesKind::Pods, &["spark"]), 1);
    list(&mut v, 0, vec![pod("a", Some("10.0.0.1"), true, false)]);
    // A 410 relist: nothing is handed over while the list arrives, then the whole set.
    assert_eq!(v.event(0, Event::Init), None);
    assert_eq!(
        v.event(0, Event::InitApply(pod("b", Some("10.0.0.2"), true, false))),
        None
    );
    let c = v.event(0, Event::InitDone).unwrap();
    assert_eq!(
        c.reset,
        Some(Update::Reset(vec![server("b", "10.0.0.2", false)]))
    );
    assert!(
        c.log
            .iter()
            .any(|l| l.contains("server a") && l.contains("removed"))
    );
}

#[test]
fn a_terminating_pod_that_never_served_is_not_added() {
    let mut v = View::new(&settings(KubernetesKind::Pods, &["spark"]), 1);
    let c = list(&mut v, 0, vec![pod("x", Some("10.0.0.9"), false, true)]).unwrap();
    assert_eq!(c.reset, Some(Update::Reset(vec![])));
}

#[test]
fn several_namespaces_qualify_names_and_wait_for_every_list() {
    let mut v = View::new(&settings(KubernetesKind::Pods, &["a", "b"]), 2);
    assert_eq!(
        list(&mut v, 0, vec![pod("p", Some("10.0.0.1"), true, false)]),
        None
    );
    let c = list(&mut v, 1, vec![]).unwrap();
    let Some(Update::Reset(list)) = c.reset else {
        panic!("{c:?}")
    };
    assert_eq!(list[0].name, "spark/p");
}

fn app(name: &str, driver: &str) -> Object {
    Object::App(AppInfo {
        namespace: "spark".into(),
        name: name.into(),
        driver: driver.into(),
        terminating: false,
    })
}

#[test]
fn a_spark_application_is_its_driver_pod() {
    let mut v = View::new(&settings(KubernetesKind::SparkApplications, &["spark"]), 2);
    assert_eq!(list(&mut v, 0, vec![app("etl", "etl-driver")]), None);
    let c = list(
        &mut v,
        1,
        vec![pod("other-driver", Some("10.0.0.3"), true, false)],
    )
    .unwrap();
    assert_eq!(c.reset, Some(Update::Reset(vec![])));
    let c = v
        .event(
            1,
            Event::Apply(pod("etl-driver", Some("10.0.0.4"), true, false)),
        )
        .unwrap();
    assert_eq!(
        c.updates,
        vec![Update::Upsert(Discovered {
            name: "etl".into(),
            uid: "uid-etl-driver".into(),
            addr: "10.0.0.4:15002".parse().unwrap(),
            draining: false,
        })]
    );
    // The application goes: so does its server.
    let c = v.event(0, Event::Delete(app("etl", "etl-driver"))).unwrap();
    assert_eq!(c.updates, vec![Update::Remove("uid-etl-driver".into())]);
}

#[test]
fn a_spark_connect_is_its_pod_ip_once_ready() {
    let mut v = View::new(&settings(KubernetesKind::SparkConnects, &["spark"]), 1);
    let sc = |state_ready: bool, ip: Option<&str>, terminating: bool| {
        Object::Connect(ConnectInfo {
            namespace: "spark".into(),
            name: "sc".into(),
            uid: "u1".into(),
            ip: ip.map(|i| i.parse().unwrap()),
            pod: Some("sc-server".into()),
            ready: state_ready,
            terminating,
        })
    };
    let c = list(&mut v, 0, vec![sc(false, Some("10.0.0.5"), false)]).unwrap();
    assert_eq!(c.reset, Some(Update::Reset(vec![])));
    let c = v
        .event(0, Event::Apply(sc(true, Some("10.0.0.5"), false)))
        .unwrap();
    let d = Discovered {
        name: "sc".into(),
        uid: "u1/sc-server".into(),
        addr: "10.0.0.5:15002".parse().unwrap(),
        draining: false,
    };
    assert_eq!(c.updates, vec![Update::Upsert(d.clone())]);
    let c = v
        .event(0, Event::Apply(sc(false, Some("10.0.0.5"), true)))
        .unwrap();
    assert_eq!(
        c.updates,
        vec![Update::Upsert(Discovered {
            draining: true,
            ..d
        })]
    );
}

#[test]
fn endpoint_slices_take_ready_endpoints_and_drain_serving_terminating_ones() {
    let mut v = View::new(&settings(KubernetesKind::EndpointSlices, &["spark"]), 1);
    let ep = |ip: &str, pod: &str, ready, serving, terminating| EndpointInfo {
        ip: ip.parse().unwrap(),
        target: Some((format!("uid-{pod}"), pod.into())),
        ready,
        serving,
        terminating,
    };
    let slice = Object::Slice(SliceInfo {
        namespace: "spark".into(),
        name: "svc-abc".into(),
        uid: "s1".into(),
        endpoints: vec![
            ep("10.0.0.1", "a", true, true, false),
            ep("10.0.0.2", "b", false, true, true),
            ep("10.0.0.3", "c", false, false, true),
            ep("10.0.0.4", "d", false, false, false),
        ],
        port: Ok(15002),
    });
    let c = list(&mut v, 0, vec![slice]).unwrap();
    assert_eq!(
        c.reset,
        Some(Update::Reset(vec![
            server("a", "10.0.0.1", false),
            server("b", "10.0.0.2", true),
        ]))
    );
}

#[test]
fn label_selectors_are_checked() {
    for ok in [
        "spark-role=driver",
        "spark-role=driver,sparkoperator.k8s.io/app-name",
        "spark-role==driver, !canary",
        "env in (prod, staging),tier notin (x)",
        "app!=x",
    ] {
        assert_eq!(check_selector(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "a=b,,c=d",
        "env in prod",
        "-x=y",
        "a=b(c",
        "Spark.IO/x=y",
    ] {
        assert!(check_selector(bad).is_err(), "{bad} should be refused");
    }
}

#[test]
fn describes_sources_for_operators() {
    let mut s = settings(KubernetesKind::Pods, &["spark"]);
    s.selector = Some("spark-role=driver".into());
    assert_eq!(
        describe(&s),
        "kubernetes pods in namespace spark, selector spark-role=driver, port 15002"
    );
    assert_eq!(
        describe(&settings(KubernetesKind::SparkConnects, &[])),
        "kubernetes sparkconnects in all namespaces, port 15002"
    );
}

/// Events that arrive together are recorded one by one and handed over as one change: the net
/// difference, in uid order, with nothing for an object that came and went within the burst.
#[test]
fn a_burst_of_events_is_one_change() {
    let mut v = View::new(&settings(KubernetesKind::Pods, &["spark"]), 1);
    list(&mut v, 0, vec![pod("a", Some("10.0.0.1"), true, false)]).unwrap();
    let burst = [
        Event::Apply(pod("b", Some("10.0.0.2"), true, false)),
        Event::Apply(pod("c", Some("10.0.0.3"), true, false)),
        Event::Apply(pod("a", Some("10.0.0.1"), true, true)),
        Event::Apply(pod("d", Some("10.0.0.4"), true, false)),
        Event::Delete(pod("d", Some("10.0.0.4"), true, false)),
    ];
    for e in burst {
        assert_eq!(v.apply(0, e), Step::Changed);
    }
    let c = v.changes(false).unwrap();
    assert_eq!(c.reset, None);
    assert_eq!(
        c.updates,
        vec![
            Update::Upsert(server("a", "10.0.0.1", true)),
            Update::Upsert(server("b", "10.0.0.2", false)),
            Update::Upsert(server("c", "10.0.0.3", false)),
        ]
    );
    // Nothing new since: nothing to hand over, and the view still knows what it sent.
    assert_eq!(v.changes(false), None);
    let c = v
        .event(0, Event::Delete(pod("b", Some("10.0.0.2"), true, false)))
        .unwrap();
    assert_eq!(c.updates, vec![Update::Remove("uid-b".into())]);
}

/// Between lists, pods' changes are worked out from the objects an event touched: after every
/// batch of random events (ready flips, terminations, new IPs, deletes, a pod back under its
/// name with a new uid), what was handed over so far is what working it out from every object
/// gives — for one namespace and for two.
#[test]
fn changes_worked_out_per_event_are_what_every_object_gives() {
    for namespaces in [&["spark"][..], &["spark", "etl"][..]] {
        let mut v = View::new(
            &settings(KubernetesKind::Pods, namespaces),
            namespaces.len(),
        );
        let mut seen = std::collections::BTreeMap::new();
        let apply = |seen: &mut std::collections::BTreeMap<String, Discovered>, c: Change| {
            for u in c.reset.into_iter().chain(c.updates) {
                match u {
                    Update::Reset(all) => {
                        *seen = all.into_iter().map(|d| (d.uid.clone(), d)).collect();
                    }
                    Update::Upsert(d) => drop(seen.insert(d.uid.clone(), d)),
                    Update::Remove(uid) => assert!(seen.remove(&uid).is_some(), "{uid}"),
                }
            }
        };
        for i in 0..namespaces.len() {
            if let Some(c) = list(&mut v, i, vec![]) {
                apply(&mut seen, c);
            }
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut below = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..400 {
            for _ in 0..1 + below(4) {
                let i = below(namespaces.len() as u64) as usize;
                let k = below(12);
                let Object::Pod(mut p) = pod(&format!("p{k}"), Some("10.0.0.1"), true, false)
                else {
                    unreachable!()
                };
                p.namespace = namespaces[i].into();
                p.uid = format!("uid-{}-{k}-{}", namespaces[i], below(4) / 3);
                p.ip =
                    (below(6) != 0).then(|| format!("10.0.{i}.{}", below(2) + k).parse().unwrap());
                p.ready = below(3) != 0;
                p.terminating = below(5) == 0;
                let e = if below(5) == 0 {
                    Event::Delete(Object::Pod(p))
                } else {
                    Event::Apply(Object::Pod(p))
                };
                assert_eq!(v.apply(i, e), Step::Changed);
            }
            if let Some(c) = v.changes(false) {
                apply(&mut seen, c);
            }
            assert_eq!(seen, v.desired_servers());
        }
    }
}
