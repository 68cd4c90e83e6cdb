//! The shared log's linearizability checker.
//!
//! The log's sequential specification is simple: `append` returns the next
//! position; `read(p)` returns the entry at `p` or `NotWritten` if there is
//! none yet; `tail()` returns the number of positions written. A history of
//! concurrent operations (each with its invocation and completion time) is
//! linearizable against it when the checks below hold; each names the
//! anomaly it catches:
//!
//! - **diverged**: every replica ends with the same entry at every position;
//! - **lost**: an acknowledged append is in the final log at its position;
//! - **duplicated**: no append's payload is in the final log twice;
//! - **reordered**: an append acknowledged before another began has the
//!   smaller position (real-time order);
//! - **stale/wrong read**: a read returns the final entry, and not
//!   `NotWritten` for a position an earlier completed operation proved written;
//! - **tail**: a tail covers every append acknowledged before it began,
//!   never exceeds the final log, and never goes back in real time;
//! - **stream**: a stream read returns exactly the final log's entries of the
//!   stream in the range it covers.

use std::collections::{BTreeMap, HashMap};

use sharedlog::types::{Entry, Position, ReadOutcome, StreamId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    Append { stream: StreamId, payload: Vec<u8> },
    Read { position: Position },
    Tail,
    ReadStream { stream: StreamId, to: Position },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Appended(Position),
    Read(ReadOutcome),
    Tail(Position),
    /// Entries returned and the position the read covered up to.
    Stream {
        entries: Vec<(Position, Vec<u8>)>,
        next: Position,
    },
    /// The operation failed or timed out: it may or may not have happened.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub client: u64,
    pub operation: Operation,
    /// Virtual microseconds since the start.
    pub invoked: u64,
    pub completed: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    Diverged { position: Position, replica: usize },
    LengthsDiffer { lengths: Vec<usize> },
    Lost { payload: String, position: Position },
    Duplicated { payload: String, positions: Vec<Position> },
    Reordered { earlier: (String, Position), later: (String, Position) },
    WrongRead { position: Position, returned: String, expected: String },
    StaleRead { position: Position, proven_written_below: Position },
    TailMissesAppend { tail: Position, append_position: Position },
    TailBeyondLog { tail: Position, length: usize },
    TailWentBack { earlier: Position, later: Position },
    StreamMismatch { stream: StreamId, returned: Vec<Position>, expected: Vec<Position> },
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// Checks `history` against the final logs read from every replica (one
/// `Option<Entry>` per position; `None` for trimmed).
pub fn check(history: &[Event], replicas: &[Vec<Option<Entry>>]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let Some(log) = replicas.first() else { return violations };

    // Diverged.
    let lengths: Vec<usize> = replicas.iter().map(Vec::len).collect();
    if lengths.iter().any(|length| *length != lengths[0]) {
        violations.push(Violation::LengthsDiffer { lengths: lengths.clone() });
    }
    for (index, replica) in replicas.iter().enumerate().skip(1) {
        for (position, (ours, theirs)) in log.iter().zip(replica).enumerate() {
            if ours != theirs {
                violations.push(Violation::Diverged { position: position as u64, replica: index });
                break;
            }
        }
    }

    // Where each payload ended up.
    let mut placed: HashMap<&[u8], Vec<Position>> = HashMap::new();
    for entry in log.iter().flatten() {
        placed.entry(&entry.payload[..]).or_default().push(entry.position);
    }
    for (payload, positions) in &placed {
        if positions.len() > 1 {
            violations.push(Violation::Duplicated { payload: text(payload), positions: positions.clone() });
        }
    }

    // Acknowledged appends: lost?
    let acknowledged: Vec<(&Event, &[u8], Position)> = history
        .iter()
        .filter_map(|event| match (&event.operation, &event.outcome) {
            (Operation::Append { payload, .. }, Outcome::Appended(position)) => Some((event, &payload[..], *position)),
            _ => None,
        })
        .collect();
    for (_, payload, position) in &acknowledged {
        let found = log.get(*position as usize).and_then(|entry| entry.as_ref());
        if found.map(|entry| &entry.payload[..]) != Some(*payload) {
            violations.push(Violation::Lost { payload: text(payload), position: *position });
        }
    }

    // Reordered: sweep appends by invocation; everything completed before
    // an invocation must sit below it.
    let mut by_completion: Vec<&(&Event, &[u8], Position)> = acknowledged.iter().collect();
    by_completion.sort_by_key(|(event, _, _)| event.completed);
    let mut by_invocation: Vec<&(&Event, &[u8], Position)> = acknowledged.iter().collect();
    by_invocation.sort_by_key(|(event, _, _)| event.invoked);
    let mut done = 0;
    let mut highest: Option<(&[u8], Position)> = None;
    for (event, payload, position) in by_invocation {
        while done < by_completion.len() && by_completion[done].0.completed < event.invoked {
            let (_, earlier_payload, earlier_position) = by_completion[done];
            if highest.is_none_or(|(_, known)| *earlier_position > known) {
                highest = Some((earlier_payload, *earlier_position));
            }
            done += 1;
        }
        if let Some((earlier_payload, earlier_position)) = highest {
            if earlier_position >= *position {
                violations.push(Violation::Reordered {
                    earlier: (text(earlier_payload), earlier_position),
                    later: (text(payload), *position),
                });
            }
        }
    }

    // What each moment proves written: the highest position acknowledged
    // or covered by a tail, among operations completed by then.
    let mut proofs: Vec<(u64, Position)> = Vec::new(); // (completed, positions below are written)
    for event in history {
        match (&event.operation, &event.outcome) {
            (Operation::Append { .. }, Outcome::Appended(position)) => proofs.push((event.completed, position + 1)),
            (Operation::Tail, Outcome::Tail(tail)) => proofs.push((event.completed, *tail)),
            _ => {}
        }
    }
    proofs.sort();
    let written_before = |time: u64| -> Position {
        proofs.iter().take_while(|(completed, _)| *completed < time).map(|(_, below)| *below).max().unwrap_or(0)
    };

    let mut tails: Vec<(&Event, Position)> = Vec::new();
    for event in history {
        match (&event.operation, &event.outcome) {
            (Operation::Read { position }, Outcome::Read(outcome)) => {
                let expected = log.get(*position as usize).cloned();
                match outcome {
                    ReadOutcome::Entry(entry) => {
                        if expected.as_ref().and_then(|entry| entry.as_ref()) != Some(entry) {
                            violations.push(Violation::WrongRead {
                                position: *position,
                                returned: text(&entry.payload),
                                expected: format!("{expected:?}"),
                            });
                        }
                    }
                    ReadOutcome::NotWritten => {
                        let proven = written_before(event.invoked);
                        if *position < proven {
                            violations.push(Violation::StaleRead { position: *position, proven_written_below: proven });
                        }
                    }
                    ReadOutcome::Trimmed => {
                        if expected.as_ref().is_some_and(|entry| entry.is_some()) {
                            violations.push(Violation::WrongRead {
                                position: *position,
                                returned: "trimmed".into(),
                                expected: format!("{expected:?}"),
                            });
                        }
                    }
                }
            }
            (Operation::Tail, Outcome::Tail(tail)) => {
                let proven = written_before(event.invoked);
                if *tail < proven {
                    violations.push(Violation::TailMissesAppend { tail: *tail, append_position: proven - 1 });
                }
                if *tail as usize > log.len() {
                    violations.push(Violation::TailBeyondLog { tail: *tail, length: log.len() });
                }
                tails.push((event, *tail));
            }
            (Operation::ReadStream { stream, .. }, Outcome::Stream { entries, next }) => {
                let expected: Vec<Position> = log
                    .iter()
                    .take(*next as usize)
                    .flatten()
                    .filter(|entry| entry.streams.contains(stream))
                    .map(|entry| entry.position)
                    .collect();
                let returned: Vec<Position> = entries.iter().map(|(position, _)| *position).collect();
                let payloads_match = entries.iter().all(|(position, payload)| {
                    log.get(*position as usize).and_then(|entry| entry.as_ref()).map(|entry| &entry.payload[..])
                        == Some(&payload[..])
                });
                if returned != expected || !payloads_match {
                    violations.push(Violation::StreamMismatch { stream: *stream, returned, expected });
                }
            }
            _ => {}
        }
    }
    // Tails never go back in real time.
    tails.sort_by_key(|(event, _)| event.completed);
    let mut completed_tails: BTreeMap<u64, Position> = BTreeMap::new();
    for (event, tail) in &tails {
        completed_tails.insert(event.completed, *tail);
    }
    for (event, tail) in &tails {
        if let Some(earlier) = completed_tails.range(..event.invoked).map(|(_, tail)| *tail).max() {
            if earlier > *tail {
                violations.push(Violation::TailWentBack { earlier, later: *tail });
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const STREAM: StreamId = StreamId(1);

    fn entry(position: Position, payload: &str) -> Option<Entry> {
        Some(Entry {
            position,
            streams: vec![STREAM],
            kind: sharedlog::types::EntryKind::Data,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    }

    fn append(payload: &str, invoked: u64, completed: u64, outcome: Outcome) -> Event {
        Event {
            client: 1,
            operation: Operation::Append { stream: STREAM, payload: payload.as_bytes().to_vec() },
            invoked,
            completed,
            outcome,
        }
    }

    fn good_history() -> (Vec<Event>, Vec<Option<Entry>>) {
        let history = vec![
            append("a", 0, 10, Outcome::Appended(0)),
            append("b", 20, 30, Outcome::Appended(1)),
            append("c", 25, 40, Outcome::Appended(2)),
            Event { client: 2, operation: Operation::Tail, invoked: 50, completed: 60, outcome: Outcome::Tail(3) },
        ];
        (history, vec![entry(0, "a"), entry(1, "b"), entry(2, "c")])
    }

    #[test]
    fn a_correct_history_passes() {
        let (history, log) = good_history();
        assert_eq!(check(&history, &[log.clone(), log]), vec![]);
    }

    #[test]
    fn catches_a_lost_entry() {
        let (history, mut log) = good_history();
        log[1] = entry(1, "x");
        let violations = check(&history, &[log]);
        assert!(violations.iter().any(|v| matches!(v, Violation::Lost { position: 1, .. })), "{violations:?}");
    }

    #[test]
    fn catches_a_duplicated_entry() {
        let (history, mut log) = good_history();
        log.push(entry(3, "b"));
        let violations = check(&history, &[log]);
        assert!(violations.iter().any(|v| matches!(v, Violation::Duplicated { .. })), "{violations:?}");
    }

    #[test]
    fn catches_a_reordered_entry() {
        // "b" was acknowledged (t=30) before "d" began (t=35), yet sits after it.
        let history = vec![append("b", 20, 30, Outcome::Appended(1)), append("d", 35, 45, Outcome::Appended(0))];
        let log = vec![entry(0, "d"), entry(1, "b")];
        let violations = check(&history, &[log]);
        assert!(violations.iter().any(|v| matches!(v, Violation::Reordered { .. })), "{violations:?}");
    }

    #[test]
    fn catches_divergent_replicas_and_stale_reads() {
        let (mut history, log) = good_history();
        let mut other = log.clone();
        other[2] = entry(2, "z");
        history.push(Event {
            client: 3,
            operation: Operation::Read { position: 1 },
            invoked: 35,
            completed: 36,
            outcome: Outcome::Read(ReadOutcome::NotWritten),
        });
        let violations = check(&history, &[log, other]);
        assert!(violations.iter().any(|v| matches!(v, Violation::Diverged { position: 2, .. })), "{violations:?}");
        assert!(violations.iter().any(|v| matches!(v, Violation::StaleRead { position: 1, .. })), "{violations:?}");
    }

    #[test]
    fn catches_a_tail_that_misses_an_acknowledged_append() {
        let (mut history, log) = good_history();
        history.push(Event {
            client: 4,
            operation: Operation::Tail,
            invoked: 45,
            completed: 46,
            outcome: Outcome::Tail(2),
        });
        let violations = check(&history, &[log]);
        assert!(violations.iter().any(|v| matches!(v, Violation::TailMissesAppend { .. })), "{violations:?}");
    }
}
