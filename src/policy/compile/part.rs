//! The registry's share of a compile: every endpoint resolved for this node,
//! in slot order, and its identity. It depends only on the registry and the
//! node name, so a [`Compiler`](super::Compiler) keeps it while both are
//! equal, and computes the next one from it ([`RegistryPart::update`]): a
//! registry change resolves only the endpoints it added (known by address,
//! as the loader shares an unchanged file's endpoints), and numbers the
//! identities again only when a label set appears or goes. The result is the
//! one [`RegistryPart::of`] computes from nothing (a property test holds
//! them equal).

use std::sync::Arc;

use crate::api::model::{EndpointDef, EndpointKind, Label, NamespaceDef, RegistrySet};
use crate::hash::FastMap;
use crate::policy::identity;
use crate::policy::labels;
use crate::policy::registry::{self, ResolvedEndpoint};
use crate::policy::types::Identity;

/// `Slot::set` of a host endpoint (its identity is host or remote-node).
const NO_TEXT: u32 = u32::MAX;

/// One identity label set of the workloads: its canonical text, its labels
/// (one copy for every endpoint with the set), how many slots have it, and
/// its identity while it has any.
#[derive(Debug)]
struct LabelSet {
    text: Arc<str>,
    labels: Arc<[Label]>,
    uses: u32,
    id: Identity,
}

/// One slot: a registry endpoint resolved for this node.
#[derive(Debug, Clone)]
struct Slot {
    /// Where it is in `registry.endpoints`.
    index: usize,
    /// Held, so that its address names it.
    def: Arc<EndpointDef>,
    labels: Arc<[Label]>,
    this_node: bool,
    local: bool,
    /// Its workload label set (index in `sets`), or [`NO_TEXT`].
    set: u32,
}

#[derive(Debug)]
pub(super) struct RegistryPart {
    /// What the [`Compiler`](super::Compiler) knows the registry by (0 when
    /// it is not kept): a fingerprint or a revision, not a copy, which
    /// would double the memory a fleet registry takes.
    pub(super) registry: u128,
    pub(super) node_name: String,
    /// In slot order.
    slots: Vec<Slot>,
    ids: Vec<Identity>,
    sets: Vec<LabelSet>,
    by_text: FastMap<Arc<str>, u32>,
    /// The Namespace documents the labels were resolved with.
    namespaces: Vec<NamespaceDef>,
    /// Every two neighbouring slots have different [`registry::slot_key`]s,
    /// so the order does not depend on registry order (which an update does
    /// not follow).
    strict: bool,
    /// How many endpoints computing this share resolved (every one from
    /// nothing, the added ones in an update).
    pub(super) resolved_now: usize,
    /// How this share differs from the one it was updated from (`None`:
    /// computed from nothing).
    pub(super) delta: Option<Delta>,
}

/// What an update changed: which slots of the last share are still there
/// and where, which are new, and whether the identities stayed. What is
/// built over the last share (the ipcache, the addresses ipBlock peers
/// match) is patched from it instead of built again.
#[derive(Debug)]
pub(super) struct Delta {
    /// [`RegistryPart::registry`] of the share this one was updated from.
    pub(super) from: u128,
    /// Per slot of that share: its slot in this one, or [`Delta::GONE`].
    pub(super) slot_now: Vec<u32>,
    /// The slots of this share whose endpoints are new (resolved by the
    /// update), ascending.
    pub(super) added: Vec<u32>,
    /// No workload label set appeared or went: every identity, its number
    /// and its labels, is that of the last share.
    pub(super) same_sets: bool,
    /// No endpoint removed or added declares a named port.
    pub(super) same_ports: bool,
}

impl Delta {
    pub(super) const GONE: u32 = u32::MAX;
}

impl RegistryPart {
    /// From nothing.
    pub(super) fn of(registry: &RegistrySet, node_name: &str) -> RegistryPart {
        let resolved = registry::resolve(registry, node_name);
        let mut part = RegistryPart {
            registry: 0,
            node_name: node_name.to_string(),
            slots: Vec::with_capacity(resolved.len()),
            ids: Vec::new(),
            sets: Vec::new(),
            by_text: FastMap::default(),
            namespaces: registry.namespaces.clone(),
            strict: true,
            resolved_now: resolved.len(),
            delta: None,
        };
        // Each workload label set's canonical text, computed once per shared
        // copy (`resolve` gives endpoints with one label set one copy).
        let mut set_of_copy: FastMap<usize, u32> = FastMap::default();
        for r in &resolved {
            let set = match r.def.kind {
                EndpointKind::Workload => {
                    let copy = Arc::as_ptr(&r.labels).cast::<Label>() as usize;
                    match set_of_copy.get(&copy) {
                        Some(set) => {
                            part.sets[*set as usize].uses += 1;
                            *set
                        }
                        None => {
                            let set = part.add_use(&r.labels, labels::canonical(&r.labels));
                            set_of_copy.insert(copy, set);
                            set
                        }
                    }
                }
                EndpointKind::Host => NO_TEXT,
            };
            part.slots.push(Slot {
                index: r.index,
                def: registry.endpoints[r.index].clone(),
                labels: r.labels.clone(),
                this_node: r.this_node,
                local: r.local,
                set,
            });
        }
        part.strict = part
            .slots
            .windows(2)
            .all(|w| registry::slot_key(&w[0].def) < registry::slot_key(&w[1].def));
        part.number();
        part
    }

    /// The share of `registry`, computed from this one (the last registry's).
    pub(super) fn update(self, registry: &RegistrySet, node_name: &str) -> RegistryPart {
        if !self.strict
            || node_name != self.node_name
            || registry.namespaces != self.namespaces
            // Most label sets gone: from nothing, which drops them.
            || self.sets.len() > 64 && self.live_sets() * 2 < self.sets.len()
        {
            return RegistryPart::of(registry, node_name);
        }
        let mut old = self;
        // The last slots, apart: the label sets are updated beside them.
        let old_slots = std::mem::take(&mut old.slots);
        // Which endpoints are still there (by address), and where.
        let slot_of: FastMap<usize, u32> = old_slots
            .iter()
            .enumerate()
            .map(|(slot, s)| (Arc::as_ptr(&s.def) as usize, slot as u32))
            .collect();
        let mut index_now = vec![usize::MAX; old_slots.len()];
        let mut added: Vec<usize> = Vec::new();
        for (i, e) in registry.endpoints.iter().enumerate() {
            match slot_of.get(&(Arc::as_ptr(e) as usize)) {
                Some(&slot) if index_now[slot as usize] == usize::MAX => {
                    index_now[slot as usize] = i;
                }
                _ => added.push(i),
            }
        }
        drop(slot_of);
        // A label set appears or goes when it is in use after the update
        // and was not before, or the other way round (a set emptied by the
        // removals and used again by the additions is the same set): each
        // set the update touches, and whether it was in use.
        let mut sets_changed = false;
        let mut was_live: FastMap<u32, bool> = FastMap::default();
        // A named port appears or goes only with an endpoint that declares it.
        let mut ports_changed = false;
        for (slot, i) in index_now.iter().enumerate() {
            if *i != usize::MAX {
                continue;
            }
            let gone = &old_slots[slot];
            ports_changed |= !gone.def.ports.is_empty();
            if gone.set != NO_TEXT {
                was_live.entry(gone.set).or_insert(true);
                old.sets[gone.set as usize].uses -= 1;
            }
        }
        // The added endpoints resolved, in slot order.
        let namespaces = registry::namespaces_of(registry);
        let mut new: Vec<(usize, &EndpointDef)> = added
            .iter()
            .map(|i| (*i, &*registry.endpoints[*i]))
            .collect();
        new.sort_by(|(ia, a), (ib, b)| {
            registry::slot_key(a)
                .cmp(&registry::slot_key(b))
                .then(ia.cmp(ib))
        });
        if new
            .windows(2)
            .any(|w| registry::slot_key(w[0].1) == registry::slot_key(w[1].1))
        {
            return RegistryPart::of(registry, node_name);
        }
        old.resolved_now = new.len();
        let kept: Vec<u32> = (0..old_slots.len() as u32)
            .filter(|s| index_now[*s as usize] != usize::MAX)
            .collect();
        // Where each added endpoint goes among the kept slots (before
        // `kept[at]`), found before the kept slots are moved.
        let key_of = |s: &u32| registry::slot_key(&old_slots[*s as usize].def);
        let mut places: Vec<(usize, usize, &EndpointDef)> = Vec::with_capacity(new.len());
        let mut next = 0;
        for (index, def) in new {
            let key = registry::slot_key(def);
            let at = next + kept[next..].partition_point(|s| key_of(s) < key);
            if kept.get(at).is_some_and(|s| key_of(s) == key) {
                // Equal keys are ordered by registry order: from nothing.
                return RegistryPart::of(registry, node_name);
            }
            places.push((at, index, def));
            next = at;
        }
        ports_changed |= places.iter().any(|(_, _, def)| !def.ports.is_empty());
        let mut slots: Vec<Slot> = Vec::with_capacity(registry.endpoints.len());
        let mut slot_now = vec![Delta::GONE; old_slots.len()];
        let mut added_slots: Vec<u32> = Vec::with_capacity(places.len());
        // The last slots in order, moved (not cloned) into place: the kept
        // ones at their index in `registry`.
        let mut old_slots = old_slots.into_iter().enumerate().filter_map(|(s, slot)| {
            let index = index_now[s];
            (index != usize::MAX).then_some((s, Slot { index, ..slot }))
        });
        let mut taken = 0;
        let mut keep = |to: usize, slots: &mut Vec<Slot>, slot_now: &mut [u32]| {
            while taken < to {
                let (s, slot) = old_slots.next().expect("one per kept slot");
                slot_now[s] = slots.len() as u32;
                slots.push(slot);
                taken += 1;
            }
        };
        for (at, index, def) in places {
            keep(at, &mut slots, &mut slot_now);
            let (this_node, local) = registry::placement(def, node_name);
            let resolved = registry::endpoint_labels(def, &namespaces);
            let (labels, set) = match def.kind {
                EndpointKind::Workload => {
                    let text = labels::canonical(&resolved);
                    match old.by_text.get(text.as_str()).copied() {
                        Some(set) => {
                            let s = &mut old.sets[set as usize];
                            was_live.entry(set).or_insert(s.uses > 0);
                            s.uses += 1;
                            (s.labels.clone(), set)
                        }
                        None => {
                            sets_changed = true;
                            let labels: Arc<[Label]> = resolved.into();
                            let set = old.add_use(&labels, text);
                            (labels, set)
                        }
                    }
                }
                EndpointKind::Host => (resolved.into(), NO_TEXT),
            };
            added_slots.push(slots.len() as u32);
            slots.push(Slot {
                index,
                def: registry.endpoints[index].clone(),
                labels,
                this_node,
                local,
                set,
            });
        }
        keep(kept.len(), &mut slots, &mut slot_now);
        sets_changed |= was_live
            .iter()
            .any(|(set, was)| *was != (old.sets[*set as usize].uses > 0));
        old.slots = slots;
        old.delta = Some(Delta {
            from: old.registry,
            slot_now,
            added: added_slots,
            same_sets: !sets_changed,
            same_ports: !ports_changed,
        });
        if sets_changed {
            old.number();
        } else {
            old.ids = old.slot_ids();
        }
        old
    }

    /// The endpoints of `registry` (the one this part was computed from) resolved.
    pub(super) fn resolved<'a>(
        &self,
        registry: &'a RegistrySet,
    ) -> (Vec<ResolvedEndpoint<'a>>, Vec<Identity>) {
        let resolved = self
            .slots
            .iter()
            .map(|s| ResolvedEndpoint {
                def: &registry.endpoints[s.index],
                index: s.index,
                labels: s.labels.clone(),
                this_node: s.this_node,
                local: s.local,
            })
            .collect();
        (resolved, self.ids.clone())
    }

    /// Each workload identity in use and its labels (one shared copy).
    pub(super) fn workload_identities(&self) -> impl Iterator<Item = (Identity, &Arc<[Label]>)> {
        self.sets
            .iter()
            .filter(|s| s.uses > 0)
            .map(|s| (s.id, &s.labels))
    }

    /// One more slot with the label set `labels` of canonical `text`.
    fn add_use(&mut self, labels: &Arc<[Label]>, text: String) -> u32 {
        if let Some(set) = self.by_text.get(text.as_str()) {
            self.sets[*set as usize].uses += 1;
            return *set;
        }
        let text: Arc<str> = text.into();
        let set = self.sets.len() as u32;
        self.sets.push(LabelSet {
            text: text.clone(),
            labels: labels.clone(),
            uses: 1,
            id: 0,
        });
        self.by_text.insert(text, set);
        set
    }

    fn live_sets(&self) -> usize {
        self.sets.iter().filter(|s| s.uses > 0).count()
    }

    /// Number the label sets in use (`identity`'s numbering depends on all
    /// of them), and every slot's identity.
    fn number(&mut self) {
        let ids = identity::allocate_workload_texts(
            self.sets.iter().filter(|s| s.uses > 0).map(|s| &*s.text),
        );
        for s in &mut self.sets {
            s.id = if s.uses > 0 { ids[&*s.text] } else { 0 };
        }
        self.ids = self.slot_ids();
    }

    fn slot_ids(&self) -> Vec<Identity> {
        self.slots
            .iter()
            .map(|s| match s.set {
                NO_TEXT if s.this_node => identity::HOST,
                NO_TEXT => identity::REMOTE_NODE,
                set => self.sets[set as usize].id,
            })
            .collect()
    }

    /// What a fresh [`RegistryPart::of`] would hold, compared (for tests).
    #[cfg(test)]
    fn same_as(&self, other: &RegistryPart) -> bool {
        self.node_name == other.node_name
            && self.ids == other.ids
            && self.slots.len() == other.slots.len()
            && self.slots.iter().zip(&other.slots).all(|(a, b)| {
                a.index == b.index
                    && a.labels == b.labels
                    && a.this_node == b.this_node
                    && a.local == b.local
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::build;
    use crate::api::model::Interface;

    fn endpoint(k: u64, app: u64, ns: u64, host: bool, node: u64) -> EndpointDef {
        let ns = ["default", "prod"][ns as usize % 2];
        let name = format!("e{k}");
        let kind = if host { "HostEndpoint" } else { "Endpoint" };
        let origin = build::origin(kind, (!host).then_some(ns), &name);
        EndpointDef {
            kind: if host {
                EndpointKind::Host
            } else {
                EndpointKind::Workload
            },
            name: origin.name.clone(),
            namespace: origin.namespace.clone(),
            origin,
            labels: vec![build::k8s("app", &format!("a{app}"))],
            // This host (no node, or its name), or another.
            node: [None, Some("host-a"), Some("host-b")][node as usize % 3].map(Into::into),
            interface: node
                .is_multiple_of(2)
                .then(|| Interface::Name(format!("veth{k}"))),
            addresses: vec![format!("10.0.0.{}", k + 1).parse().unwrap()],
            ports: Vec::new(),
            audit: false,
        }
    }

    /// Over random sequences of registry changes (endpoints added, relabelled
    /// to new and to existing label sets, moved, removed, reordered, and a
    /// Namespace document's labels changed), the share computed from the last
    /// one is the share computed from nothing.
    #[test]
    fn an_updated_share_is_the_share_from_nothing() {
        let mut rand = crate::hash::xorshift(0x2545_f491_4f6c_dd1du64);
        for _ in 0..60 {
            let mut eps: Vec<Option<Arc<EndpointDef>>> = vec![None; 24];
            let mut reg = RegistrySet::default();
            let mut part: Option<RegistryPart> = None;
            for step in 0..40 {
                let k = rand(24);
                match rand(10) {
                    0..=5 => {
                        let e = endpoint(k, rand(6), rand(2), rand(8) == 0, rand(3));
                        eps[k as usize] = Some(Arc::new(e));
                    }
                    6 | 7 => eps[k as usize] = None,
                    8 => eps.rotate_left(rand(24) as usize),
                    _ => {
                        reg.namespaces = match rand(2) {
                            0 => Vec::new(),
                            _ => vec![NamespaceDef {
                                origin: build::origin("Namespace", None, "prod"),
                                name: "prod".into(),
                                labels: vec![build::k8s("team", &format!("t{}", rand(2)))],
                            }],
                        }
                    }
                }
                reg.endpoints = eps.iter().flatten().cloned().collect();
                let next = match part.take() {
                    Some(p) => p.update(&reg, "host-a"),
                    None => RegistryPart::of(&reg, "host-a"),
                };
                let fresh = RegistryPart::of(&reg, "host-a");
                assert!(
                    next.same_as(&fresh),
                    "step {step}:\nupdated {:?}\nfresh {:?}",
                    (&next.slots, &next.ids),
                    (&fresh.slots, &fresh.ids)
                );
                part = Some(next);
            }
        }
    }
}
