//! Every decision is a `tracing` event carrying the key and the attempt, and the handler runs
//! inside a `handle` span, so that the handler's own logs carry the key and the message id.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use prereq::Decision;
use prereq::memory::MemoryBroker;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn decisions_are_traced_and_handlers_run_in_a_span() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime has one thread: engine, handler and settle tasks all log through this.
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = MemoryBroker::new();
    broker.publish(payment(1, 7)); // held, then released and handled
    broker.publish(b"{".to_vec()); // dead-lettered
    broker.register(client(7));
    let rec = Recorder::new();
    let consumer = builder(&rec, |p: Payment| async move {
        tracing::info!(amount = 10, "charging payment {}", p.id);
        Ok(())
    })
    .build();
    run_until(consumer, &broker, &rec, |ev| {
        count(ev, |e| e.decision == Decision::Handled) == 1
    })
    .await;

    let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let line = |needle: &str| {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
            .to_owned()
    };
    let charging = line("charging payment 1");
    assert!(
        charging.contains(r#"handle{key=7 message_id="1" attempt=0}"#),
        "{charging}"
    );
    let held = line("Held");
    assert!(
        held.contains("key=7") && held.contains("attempt=0"),
        "{held}"
    );
    let dead = line("dead-lettered");
    assert!(dead.contains("reason_kind=\"undecodable\""), "{dead}");
}
