//! What a reload changes: a keyed diff of two lists, and the one-line summary the log and the
//! admin socket print.

use std::collections::HashMap;
use std::hash::Hash;

use super::Config;

/// One keyed change between two lists.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit<K, V> {
    Added(V),
    Removed(K),
    Changed(V),
}

/// The changes that turn `old` into `new`, items matched by `key`.
pub fn diff<K: Eq + Hash + Clone, V: PartialEq + Clone>(
    old: &[V],
    new: &[V],
    key: impl Fn(&V) -> K,
) -> Vec<Edit<K, V>> {
    let old_by: HashMap<K, &V> = old.iter().map(|v| (key(v), v)).collect();
    let new_keys: HashMap<K, ()> = new.iter().map(|v| (key(v), ())).collect();
    let mut out = Vec::new();
    for v in new {
        match old_by.get(&key(v)) {
            None => out.push(Edit::Added(v.clone())),
            Some(o) if *o != v => out.push(Edit::Changed(v.clone())),
            Some(_) => {}
        }
    }
    for v in old {
        if !new_keys.contains_key(&key(v)) {
            out.push(Edit::Removed(key(v)));
        }
    }
    out
}

/// Applies `changes` to `old`: kept items in their order, then added ones.
pub fn apply<K: Eq + Hash + Clone, V: Clone>(
    old: &[V],
    changes: &[Edit<K, V>],
    key: impl Fn(&V) -> K,
) -> Vec<V> {
    let mut out: Vec<V> = Vec::with_capacity(old.len());
    for v in old {
        let k = key(v);
        if changes
            .iter()
            .any(|c| matches!(c, Edit::Removed(r) if *r == k))
        {
            continue;
        }
        let changed = changes.iter().find_map(|c| match c {
            Edit::Changed(n) if key(n) == k => Some(n.clone()),
            _ => None,
        });
        out.push(changed.unwrap_or_else(|| v.clone()));
    }
    for c in changes {
        if let Edit::Added(v) = c {
            out.push(v.clone());
        }
    }
    out
}

/// Counts of a diff, for the log line.
fn counts<K, V>(changes: &[Edit<K, V>]) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for ch in changes {
        match ch {
            Edit::Added(_) => c.0 += 1,
            Edit::Removed(_) => c.1 += 1,
            Edit::Changed(_) => c.2 += 1,
        }
    }
    c
}

/// A one-line summary of what a reload changes.
pub fn summary(old: &Config, new: &Config) -> String {
    let fe = counts(&diff(&old.frontends, &new.frontends, |f| f.name.clone()));
    let be = counts(&diff(&old.backends, &new.backends, |b| b.name.clone()));
    let mut srv = (0, 0, 0);
    for nb in &new.backends {
        let empty = Vec::new();
        let olds = old
            .backends
            .iter()
            .find(|b| b.name == nb.name)
            .map(|b| &b.servers)
            .unwrap_or(&empty);
        let c = counts(&diff(olds, &nb.servers, |s| (s.name.clone(), s.addr)));
        srv = (srv.0 + c.0, srv.1 + c.1, srv.2 + c.2);
    }
    for ob in old
        .backends
        .iter()
        .filter(|o| !new.backends.iter().any(|n| n.name == o.name))
    {
        srv.1 += ob.servers.len();
    }
    format!(
        "frontends +{} -{} ~{}, backends +{} -{} ~{}, servers +{} -{} ~{}",
        fe.0, fe.1, fe.2, be.0, be.1, be.2, srv.0, srv.1, srv.2
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Applying diff(a, b) to a gives b (as a keyed set, values included).
        #[test]
        fn applying_the_diff_gives_the_new_list(
            a in proptest::collection::btree_map(0u8..20, 0u8..4, 0..12),
            b in proptest::collection::btree_map(0u8..20, 0u8..4, 0..12),
        ) {
            let a: Vec<(u8, u8)> = a.into_iter().collect();
            let b: Vec<(u8, u8)> = b.into_iter().collect();
            let d = diff(&a, &b, |v| v.0);
            let mut got = apply(&a, &d, |v| v.0);
            got.sort();
            prop_assert_eq!(got, b.clone());
            // And no change at all between equal lists.
            prop_assert!(diff(&b, &b, |v| v.0).is_empty());
        }
    }
}
