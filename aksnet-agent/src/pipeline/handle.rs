//! The per-event stages after the capture: the flow table decides what is news, the classifier
//! checks it against the model, and the outputs (dump, metrics) show it.

use super::labels::{names, nat_hops, observation, source_pod};
use super::{AgentError, Matcher, EVENT_BATCH};
use crate::capture::netns::IfNames;
use crate::enrich::{Enricher, OwnerKind};
use crate::events::{EventKind, FlowEvent};
use crate::flows::{FlowTable, InterfaceWait, Update};
use crate::metrics::Metrics;
use crate::model::Classification;
use crate::output::dump::{self, Dump, FlowView};
use crate::output::explain;
use crate::startup::Classify;
use crate::topology::OutboundType;
use std::io::Write;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The per-event work: table, classification, outputs.
pub(super) struct Pipeline<W: Write> {
    pub(super) table: FlowTable,
    pub(super) ifnames: IfNames,
    pub(super) classifier: Classify,
    pub(super) enricher: Enricher,
    pub(super) metrics: Option<Arc<Metrics>>,
    pub(super) dump: Option<Dump<W>>,
    /// Write hop diagrams instead of dump lines.
    pub(super) diagram: bool,
    pub(super) verbose: bool,
    pub(super) matching: Option<Matcher>,
    pub(super) show_ends: bool,
    /// Dump lines written so far, for `--count`.
    pub(super) shown: u64,
}

impl<W: Write> Pipeline<W> {
    /// Whether `--count` flows were shown.
    pub(super) fn done(&self, count: Option<u64>) -> bool {
        count.is_some_and(|n| self.shown >= n)
    }

    /// Handles `first` and what is already queued behind it, up to [`EVENT_BATCH`]: the loop
    /// wakes up, and the dump is written out, once per batch, not once per event.
    pub(super) fn handle_queued(
        &mut self,
        first: FlowEvent,
        rx: &mut mpsc::Receiver<FlowEvent>,
        waiting: &mut InterfaceWait,
        count: Option<u64>,
    ) -> Result<(), AgentError> {
        let now = std::time::Instant::now();
        let (mut next, mut handled) = (Some(first), 0);
        while let Some(event) = next {
            self.handle_all(waiting.offer(event, now), count)?;
            handled += 1;
            if handled == EVENT_BATCH || self.done(count) {
                break;
            }
            next = rx.try_recv().ok();
        }
        self.flush()
    }

    /// Writes out the dump lines of the events handled since the last flush.
    pub(super) fn flush(&mut self) -> Result<(), AgentError> {
        match &mut self.dump {
            Some(dump) => dump.flush().map_err(AgentError::Output),
            None => Ok(()),
        }
    }

    /// [`handle`](Self::handle)s events in order, stopping once `--count` lines are shown.
    pub(super) fn handle_all(
        &mut self,
        events: impl IntoIterator<Item = FlowEvent>,
        count: Option<u64>,
    ) -> Result<(), AgentError> {
        for event in events {
            if self.done(count) {
                break;
            }
            self.handle(event)?;
        }
        Ok(())
    }

    fn handle(&mut self, event: FlowEvent) -> Result<(), AgentError> {
        let update = self.table.apply(event);
        // Evicted flows' ends will never arrive: close them for the live-SNAT accounting now.
        for flow in self.table.drain_evicted() {
            if let Some(metrics) = &self.metrics {
                metrics.observe_end(&flow.event.key(), &flow.event.translated());
            }
        }
        match update {
            Update::Opened(flow) => self.report(EventKind::New, &flow.event),
            Update::NatChanged { flow, was } => {
                if let Some(metrics) = &self.metrics {
                    let event = &flow.event;
                    metrics.observe_nat_change(&event.key(), &was, &event.translated());
                }
                self.report(EventKind::NatChanged, &flow.event)
            }
            Update::Closed(flow) => self.close(&flow.event),
            Update::Replaced { ended, opened } => {
                self.close(&ended.event)?;
                self.report(EventKind::New, &opened.event)
            }
            Update::OpenedAndClosed(flow) => {
                self.report(EventKind::New, &flow.event)?;
                self.close(&flow.event)
            }
            Update::Unchanged => Ok(()),
        }
    }

    fn close(&mut self, event: &FlowEvent) -> Result<(), AgentError> {
        if let Some(metrics) = &self.metrics {
            metrics.observe_end(&event.key(), &event.translated());
        }
        if self.show_ends {
            let view = self.view(EventKind::Destroy, event, None);
            self.write(&view)?;
        }
        Ok(())
    }

    fn report(&mut self, kind: EventKind, event: &FlowEvent) -> Result<(), AgentError> {
        let mut view = self.view(kind, event, None);
        let class = self.classifier.classify_with_interfaces(
            event,
            view.in_iface.as_deref(),
            view.out_iface.as_deref(),
        );
        if let (Some(metrics), EventKind::New) = (&self.metrics, kind) {
            let topology = self.classifier.topology();
            let pod = source_pod(
                &self.enricher,
                topology,
                event.orig.src,
                view.in_iface.as_deref(),
            );
            let outbound = topology.map_or(OutboundType::default(), |t| t.outbound_type);
            let marks = class.hop_marks();
            let hops = nat_hops(&marks, outbound);
            metrics.observe_new(&observation(event, &class, &marks, &hops, pod.as_deref()));
            if let Some(lost) = dump::client_address_lost_at(&class, &marks) {
                let service = self.service_of(event);
                metrics.observe_client_address_lost(service.as_deref(), lost.hop_class);
            }
        }
        view.classification = Some(&class);
        self.write(&view)
    }

    /// The Service an inbound connection was addressed to (its frontend, cluster IP or node
    /// port), as the enrichment or else the topology's LB frontends know it; `None` when it was
    /// addressed to a pod directly (Application Gateway, AGC).
    fn service_of(&self, event: &FlowEvent) -> Option<String> {
        let dst = &event.orig;
        self.enricher
            .lookup_port(dst.dst, event.proto, dst.dport)
            .filter(|owner| owner.kind == OwnerKind::Service)
            .map(|owner| owner.to_string())
            .or_else(|| {
                self.classifier
                    .topology()?
                    .lb_frontends()
                    .iter()
                    .find(|frontend| frontend.ip == dst.dst)
                    .and_then(|frontend| frontend.service.clone())
            })
    }

    fn view<'a>(
        &self,
        kind: EventKind,
        event: &'a FlowEvent,
        classification: Option<&'a Classification>,
    ) -> FlowView<'a> {
        let name = |index: Option<u32>| index.and_then(|i| self.ifnames.name(i).ok().flatten());
        FlowView {
            kind,
            event,
            in_iface: name(event.in_ifindex),
            out_iface: name(event.out_ifindex),
            names: names(&self.enricher, event),
            classification,
        }
    }

    fn write(&mut self, view: &FlowView<'_>) -> Result<(), AgentError> {
        let Some(dump) = &mut self.dump else {
            return Ok(());
        };
        if self.matching.is_some_and(|m| !m.matches(view.event)) {
            return Ok(());
        }
        match (self.diagram, view.classification) {
            (true, Some(class)) => {
                dump.write_raw(&explain::render(view.event, class, self.verbose))
            }
            (true, None) => return Ok(()),
            (false, _) => dump.write(view),
        }
        .map_err(AgentError::Output)?;
        self.shown += 1;
        Ok(())
    }
}
