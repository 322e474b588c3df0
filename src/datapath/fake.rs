//! [`FakeDatapath`]: an in-memory [`Datapath`] for tests of the reconcile loop
//! (and `netpold --fake-datapath`). It records what was applied and attached,
//! can be told to fail, and touches no kernel.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Attachment, Counters, Datapath, DatapathError, DnsProxyTarget, DnsRedirect, VerdictEvent,
};
use crate::policy::types::Compiled;

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub generation: u64,
    /// The state of the active generation.
    pub active: Option<Compiled>,
    pub attached: BTreeSet<Attachment>,
    /// Every successful apply, in order.
    pub applied: Vec<(u64, Compiled)>,
    /// Make the next apply fail (once) with [`DatapathError::Injected`] carrying
    /// this message.
    pub fail_next_apply: Option<String>,
    pub events: Vec<VerdictEvent>,
    /// The DNS redirect as last set.
    pub dns_redirect: Option<(DnsProxyTarget, Vec<DnsRedirect>)>,
    /// What `live_flows` reports: (ifindex, address, address).
    pub live_flows: Vec<(u32, std::net::IpAddr, std::net::IpAddr)>,
}

impl FakeDatapath {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Datapath for FakeDatapath {
    fn apply(
        &mut self,
        state: &Compiled,
        _attachments: &[Attachment],
    ) -> Result<u64, DatapathError> {
        if let Some(msg) = self.fail_next_apply.take() {
            return Err(DatapathError::Injected { message: msg });
        }
        self.generation += 1;
        self.active = Some(state.clone());
        self.applied.push((self.generation, state.clone()));
        Ok(self.generation)
    }

    fn sync_attachments(&mut self, attachments: &[Attachment]) -> Result<(), DatapathError> {
        self.attached = attachments.iter().copied().collect();
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn poll_events(&mut self, max: usize) -> Vec<VerdictEvent> {
        let n = max.min(self.events.len());
        self.events.drain(..n).collect()
    }

    fn counters(&self) -> BTreeMap<u32, Counters> {
        BTreeMap::new()
    }

    fn set_dns_redirect(
        &mut self,
        proxy: DnsProxyTarget,
        redirects: &[DnsRedirect],
    ) -> Result<(), DatapathError> {
        self.dns_redirect = Some((proxy, redirects.to_vec()));
        Ok(())
    }

    fn live_flows(&self) -> Vec<(u32, std::net::IpAddr, std::net::IpAddr)> {
        self.live_flows.clone()
    }

    fn detach_all(&mut self) -> Result<(), DatapathError> {
        self.attached.clear();
        self.active = None;
        Ok(())
    }
}
