//! The VMM thread's event loop: its subscriber type, and the subscriber that wakes it when the
//! VM must stop. Devices, the console input and the VMM all meet here, so this module depends on
//! none of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

use crate::boot_timer::Timeline;
use crate::stop::StopNotifier;

/// The subscriber type of loft's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// loft's event loop.
pub type EventLoop = EventManager<Subscriber>;

/// Wakes the event loop when a stop is requested, and records when.
pub struct StopWatch {
    notifier: Arc<StopNotifier>,
    fired: Arc<AtomicBool>,
    timeline: Arc<Timeline>,
}

impl StopWatch {
    /// Watches `notifier`; `fired` is set when it fires.
    pub fn new(
        notifier: Arc<StopNotifier>,
        fired: Arc<AtomicBool>,
        timeline: Arc<Timeline>,
    ) -> Self {
        Self {
            notifier,
            fired,
            timeline,
        }
    }
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.notifier.event(), EventSet::IN)) {
            log::error!("cannot watch the stop event: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.notifier.event().read();
        self.timeline.mark(|t| &mut t.stop_request);
        self.fired.store(true, Ordering::Release);
    }
}
