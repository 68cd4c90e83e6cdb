//! One iSCSI connection: the login phase, then the full feature phase.
//!
//! - The reader (this task) takes PDUs in order, keeps the CmdSN window
//!   (non-immediate commands run in CmdSN order; ones outside the window
//!   are dropped, as RFC 7143 §4.2.2.1 says), routes Data-Out PDUs to the
//!   command waiting for them and starts a task per SCSI command.
//! - The writer task sends every PDU and numbers them: StatSN for status
//!   PDUs, ExpCmdSN and MaxCmdSN for all, so numbers go out in order.
//! - Error recovery level 0: a header digest error or an oversized PDU
//!   drops the connection; a data digest error or a PDU this target does
//!   not take is answered with a Reject and the connection goes on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch, Notify};

use crate::datamover::{Datamover, PduReader, PduWriter, ReadError};
use crate::login::{Login, Outcome, Params, SessionType};
use crate::pdu::{reject, Digests, Opcode, Pdu};
use crate::sanitize;
use crate::scsi::{self, Command, Port, Reply};
use crate::sense::{self, status, Sense};
use crate::target::{Registry, Target};
use crate::text;

/// Commands a session may have outstanding (MaxCmdSN - ExpCmdSN + 1).
pub const COMMAND_WINDOW: u32 = 128;
/// The largest write this target collects for one command.
const WRITE_BYTES_MAX: u32 = 64 * 1024 * 1024;
const NO_TAG: u32 = 0xffff_ffff;
const LOGIN_DATA_MAX: usize = 8192;

/// How the writer numbers a PDU.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// Takes the next StatSN (responses).
    Status,
    /// Carries the next StatSN without taking it (R2T, unsolicited NOP-In).
    Peek,
    /// ExpCmdSN and MaxCmdSN only (Data-In without status).
    Window,
}

enum Out {
    Pdu(Pdu, Numbering),
    /// Send what came before, then close the connection.
    Close,
}

/// Where a task stands, decided under its lock so that an abort and a
/// response never both happen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Running,
    Aborted,
    Answered,
}

/// A SCSI command under way.
struct Task {
    lun: u64,
    stage: Mutex<Stage>,
    aborted: watch::Sender<bool>,
    finished: AtomicBool,
    done: Notify,
}

struct Session {
    registry: Arc<Registry>,
    target: Option<Arc<Target>>,
    kind: SessionType,
    params: Params,
    nexus: crate::pr::Nexus,
    port: Port,
    /// The target's LUN numbers (REPORT LUNS), as of login.
    luns: Vec<u64>,
    out: mpsc::UnboundedSender<Out>,
    exp_cmd_sn: AtomicU32,
    /// The highest MaxCmdSN sent: commands up to it are in the window.
    max_cmd_sn: AtomicU32,
    in_flight: AtomicU32,
    tasks: Mutex<HashMap<u32, Arc<Task>>>,
    routes: Mutex<HashMap<u32, mpsc::Sender<Pdu>>>,
    next_tag: AtomicU32,
    /// A Text response too long for one PDU: (target transfer tag, rest).
    text_rest: Mutex<Option<(u32, Bytes)>>,
}

fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// Serves one connection until it closes.
pub async fn run<D: Datamover>(registry: Arc<Registry>, mover: D) {
    let peer = mover.peer();
    let (mut reader, mut writer) = mover.split();
    let mut login = Login::new();
    let mut stat_sn: u32 = rand::random::<u32>() & 0x0fff_ffff;
    let (tsih, closed) = loop {
        let pdu = match reader.read_pdu(Digests::default(), LOGIN_DATA_MAX).await {
            Ok(pdu) => pdu,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection closed during login");
                return;
            }
        };
        if pdu.opcode() != Some(Opcode::LoginRequest) {
            tracing::info!(%peer, opcode = pdu.opcode_byte(), "a PDU other than Login before full feature phase");
            let mut response = Pdu::new(Opcode::LoginResponse);
            response.set_initiator_task_tag(pdu.initiator_task_tag());
            response.bhs[36..38].copy_from_slice(&crate::login::status::INVALID_DURING_LOGIN.to_be_bytes());
            let _ = writer.write_pdus(&[response], Digests::default()).await;
            writer.shutdown().await;
            return;
        }
        let (mut response, outcome) = login.step(&pdu, &registry);
        let exp_cmd_sn = pdu.cmd_sn();
        response.set_sequence(stat_sn, exp_cmd_sn, exp_cmd_sn.wrapping_add(COMMAND_WINDOW - 1));
        stat_sn = stat_sn.wrapping_add(1);
        match outcome {
            Outcome::Continue => {
                if writer.write_pdus(&[response], Digests::default()).await.is_err() {
                    return;
                }
            }
            Outcome::Fail => {
                let code = u16::from_be_bytes([response.bhs[36], response.bhs[37]]);
                if code == crate::login::status::TARGET_MOVED_TEMPORARILY {
                    registry.counters.redirects.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, initiator = %login.initiator, "login redirected");
                } else {
                    registry.counters.login_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, initiator = %login.initiator, code = format!("{code:#06x}"), "login refused");
                }
                let _ = writer.write_pdus(&[response], Digests::default()).await;
                writer.shutdown().await;
                return;
            }
            Outcome::Complete => {
                let (tsih, closed) = registry.open_session(&login.initiator, login.isid);
                response.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
                if writer.write_pdus(&[response], Digests::default()).await.is_err() {
                    registry.close_session(&login.initiator, login.isid, tsih);
                    return;
                }
                break (tsih, closed);
            }
        }
    };
    registry.counters.logins.fetch_add(1, Ordering::Relaxed);
    let kind = login.session_type.unwrap_or(SessionType::Normal);
    tracing::info!(%peer, initiator = %login.initiator, target = ?login.target.as_ref().map(|t| t.name.clone()),
        ?kind, params = ?login.params, "login complete");
    let digests = Digests { header: login.params.header_digest, data: login.params.data_digest };
    // Unbounded: what is queued is bounded by the command window.
    let (out, queue) = mpsc::unbounded_channel();
    let group = registry.portal_group();
    let session = Arc::new(Session {
        registry: registry.clone(),
        target: login.target.clone(),
        kind,
        params: login.params.clone(),
        nexus: crate::pr::Nexus::new(login.nexus(), group),
        luns: login.target.as_ref().map(|target| target.lun_numbers()).unwrap_or_default(),
        port: Port {
            target: login.target.as_ref().map(|target| target.name.clone()).unwrap_or_default(),
            relative_port: group,
            group,
        },
        out,
        exp_cmd_sn: AtomicU32::new(login.cmd_sn),
        max_cmd_sn: AtomicU32::new(login.cmd_sn.wrapping_add(COMMAND_WINDOW - 1)),
        in_flight: AtomicU32::new(0),
        tasks: Mutex::new(HashMap::new()),
        routes: Mutex::new(HashMap::new()),
        next_tag: AtomicU32::new(1),
        text_rest: Mutex::new(None),
    });
    let writing = tokio::spawn(write_loop(writer, queue, session.clone(), stat_sn, digests));
    read_loop(&session, &mut reader, closed, digests).await;
    // The connection is gone: abort what runs, drop the nexus's RESERVE(6).
    let tasks: Vec<Arc<Task>> = session.tasks.lock().expect("tasks").values().cloned().collect();
    for task in tasks {
        let _ = task.aborted.send(true);
    }
    if let Some(target) = &session.target {
        for unit in target.luns.values() {
            unit.nexus_lost(&session.nexus);
        }
    }
    registry.close_session(&login.initiator, login.isid, tsih);
    let _ = session.out.send(Out::Close);
    drop(session);
    let _ = writing.await;
    tracing::info!(%peer, initiator = %login.initiator, "session closed");
}

async fn write_loop<W: PduWriter>(
    mut writer: W,
    mut queue: mpsc::UnboundedReceiver<Out>,
    session: Arc<Session>,
    mut stat_sn: u32,
    digests: Digests,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        let Some(first) = queue.recv().await else { break };
        let mut close = false;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Out::Pdu(mut pdu, numbering) => {
                    let exp = session.exp_cmd_sn.load(Ordering::Acquire);
                    let in_flight = session.in_flight.load(Ordering::Acquire).min(COMMAND_WINDOW - 1);
                    let mut max = exp.wrapping_add(COMMAND_WINDOW - 1 - in_flight);
                    // MaxCmdSN never goes back.
                    let sent = session.max_cmd_sn.load(Ordering::Acquire);
                    if serial_lt(max, sent) {
                        max = sent;
                    } else {
                        session.max_cmd_sn.store(max, Ordering::Release);
                    }
                    match numbering {
                        Numbering::Status => {
                            pdu.set_sequence(stat_sn, exp, max);
                            stat_sn = stat_sn.wrapping_add(1);
                        }
                        Numbering::Peek => pdu.set_sequence(stat_sn, exp, max),
                        Numbering::Window => {
                            pdu.set_u32_at(28, exp);
                            pdu.set_u32_at(32, max);
                        }
                    }
                    batch.push(pdu);
                }
                Out::Close => {
                    close = true;
                    break;
                }
            }
            if batch.len() < 64 {
                next = queue.try_recv().ok();
            }
        }
        if !batch.is_empty() && writer.write_pdus(&batch, digests).await.is_err() {
            break;
        }
        batch.clear();
        if close {
            break;
        }
    }
    writer.shutdown().await;
}

async fn read_loop<R: PduReader>(
    session: &Arc<Session>,
    reader: &mut R,
    mut closed: watch::Receiver<bool>,
    digests: Digests,
) {
    let max_data = session.params.target_max_recv as usize;
    // Non-immediate commands that came early, by CmdSN.
    let mut early: BTreeMap<u32, Pdu> = BTreeMap::new();
    loop {
        let pdu = tokio::select! {
            _ = closed.changed() => {
                tracing::info!(nexus = %session.nexus, "closed by a newer session of the same initiator port");
                return;
            }
            read = reader.read_pdu(digests, max_data) => match read {
                Ok(pdu) => pdu,
                Err(ReadError::Pdu { error, header: Some(header) }) => {
                    tracing::warn!(nexus = %session.nexus, %error, "rejecting a PDU");
                    session.reject(error.reject_reason().unwrap_or(reject::PROTOCOL_ERROR), &header).await;
                    continue;
                }
                Err(ReadError::Closed) => return,
                Err(error) => {
                    tracing::warn!(nexus = %session.nexus, %error, "dropping the connection");
                    return;
                }
            },
        };
        let Some(opcode) = pdu.opcode() else {
            session.reject(reject::COMMAND_NOT_SUPPORTED, &pdu.bhs).await;
            continue;
        };
        match opcode {
            Opcode::DataOut => session.route_data_out(pdu).await,
            Opcode::ScsiCommand
            | Opcode::NopOut
            | Opcode::TaskManagementRequest
            | Opcode::TextRequest
            | Opcode::LogoutRequest => {
                if pdu.immediate() {
                    if !session.dispatch(pdu).await {
                        return;
                    }
                    continue;
                }
                let sn = pdu.cmd_sn();
                let exp = session.exp_cmd_sn.load(Ordering::Acquire);
                if sn == exp {
                    session.exp_cmd_sn.store(exp.wrapping_add(1), Ordering::Release);
                    if !session.dispatch(pdu).await {
                        return;
                    }
                    loop {
                        let exp = session.exp_cmd_sn.load(Ordering::Acquire);
                        let Some(pdu) = early.remove(&exp) else { break };
                        session.exp_cmd_sn.store(exp.wrapping_add(1), Ordering::Release);
                        if !session.dispatch(pdu).await {
                            return;
                        }
                    }
                } else if serial_lt(exp, sn) && !serial_lt(session.max_cmd_sn.load(Ordering::Acquire), sn) {
                    early.insert(sn, pdu);
                } else {
                    tracing::debug!(nexus = %session.nexus, sn, exp, "dropping a command outside the CmdSN window");
                }
            }
            Opcode::Snack => session.reject(reject::COMMAND_NOT_SUPPORTED, &pdu.bhs).await,
            _ => session.reject(reject::PROTOCOL_ERROR, &pdu.bhs).await,
        }
    }
}

impl Session {
    async fn send(&self, pdu: Pdu, numbering: Numbering) {
        let _ = self.out.send(Out::Pdu(pdu, numbering));
    }

    async fn reject(&self, reason: u8, header: &[u8; 48]) {
        self.registry.counters.rejects.fetch_add(1, Ordering::Relaxed);
        let mut pdu = Pdu::new(Opcode::Reject);
        pdu.set_flags(0x80);
        pdu.bhs[2] = reason;
        pdu.set_initiator_task_tag(NO_TAG);
        pdu.data = Bytes::copy_from_slice(header);
        self.send(pdu, Numbering::Status).await;
    }

    /// Runs one command in CmdSN order; false when the connection ends.
    async fn dispatch(self: &Arc<Self>, pdu: Pdu) -> bool {
        match pdu.opcode() {
            Some(Opcode::ScsiCommand) => self.scsi_command(pdu).await,
            Some(Opcode::NopOut) => {
                if pdu.initiator_task_tag() != NO_TAG {
                    let mut reply = Pdu::new(Opcode::NopIn);
                    reply.set_flags(0x80);
                    reply.bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
                    reply.set_initiator_task_tag(pdu.initiator_task_tag());
                    reply.set_u32_at(20, NO_TAG);
                    reply.data = pdu.data.clone();
                    self.send(reply, Numbering::Status).await;
                }
            }
            Some(Opcode::TaskManagementRequest) => {
                let session = self.clone();
                tokio::spawn(async move { session.task_management(pdu).await });
            }
            Some(Opcode::TextRequest) => self.text(pdu).await,
            Some(Opcode::LogoutRequest) => {
                let reason = pdu.flags() & 0x7f;
                let mut reply = Pdu::new(Opcode::LogoutResponse);
                reply.set_flags(0x80);
                // Closing the session or the connection; recovery is not
                // offered at error recovery level 0.
                reply.bhs[2] = if reason == 2 { 2 } else { 0 };
                reply.set_initiator_task_tag(pdu.initiator_task_tag());
                self.send(reply, Numbering::Status).await;
                if reason != 2 {
                    // Let running commands answer first.
                    self.wait_for_tasks().await;
                    let _ = self.out.send(Out::Close);
                    return false;
                }
            }
            _ => self.reject(reject::PROTOCOL_ERROR, &pdu.bhs).await,
        }
        true
    }

    async fn wait_for_tasks(&self) {
        for _ in 0..3000 {
            if self.tasks.lock().expect("tasks").is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    async fn route_data_out(&self, pdu: Pdu) {
        let route = self.routes.lock().expect("routes").get(&pdu.initiator_task_tag()).cloned();
        match route {
            Some(route) => {
                let _ = route.send(pdu).await;
            }
            None => tracing::debug!(itt = pdu.initiator_task_tag(), "Data-Out for no command under way; dropped"),
        }
    }

    async fn scsi_command(self: &Arc<Self>, pdu: Pdu) {
        if self.kind == SessionType::Discovery {
            self.reject(reject::PROTOCOL_ERROR, &pdu.bhs).await;
            return;
        }
        self.registry.counters.commands.fetch_add(1, Ordering::Relaxed);
        let itt = pdu.initiator_task_tag();
        let lun = scsi::decode_lun(pdu.lun());
        let (aborted, _) = watch::channel(false);
        let task = Arc::new(Task {
            lun,
            stage: Mutex::new(Stage::Running),
            aborted,
            finished: AtomicBool::new(false),
            done: Notify::new(),
        });
        let duplicate = {
            let mut tasks = self.tasks.lock().expect("tasks");
            let duplicate = tasks.contains_key(&itt);
            if !duplicate {
                tasks.insert(itt, task.clone());
            }
            duplicate
        };
        if duplicate {
            tracing::warn!(itt, "a task tag already in use; rejected");
            self.reject(reject::INVALID_PDU_FIELD, &pdu.bhs).await;
            return;
        }
        let wanted = self.data_out_wanted(&pdu);
        let data_out = if wanted > pdu.data.len() {
            let (route, data_out) = mpsc::channel(64);
            self.routes.lock().expect("routes").insert(itt, route);
            Some(data_out)
        } else {
            None
        };
        let counted = !pdu.immediate();
        if counted {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let session = self.clone();
        tokio::spawn(async move {
            session.run_command(&task, pdu, data_out, counted).await;
            session.routes.lock().expect("routes").remove(&itt);
            session.tasks.lock().expect("tasks").remove(&itt);
            task.finished.store(true, Ordering::Release);
            task.done.notify_waiters();
        });
    }

    async fn run_command(&self, task: &Task, pdu: Pdu, data_out: Option<mpsc::Receiver<Pdu>>, counted: bool) {
        let itt = pdu.initiator_task_tag();
        let flags = pdu.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let expected = pdu.u32_at(20);
        let mut cdb = pdu.bhs[32..48].to_vec();
        if pdu.ahs.len() >= 4 && pdu.ahs[2] == 1 {
            // Extended CDB AHS.
            let length = usize::from(u16::from_be_bytes([pdu.ahs[0], pdu.ahs[1]]));
            if let Some(extra) = pdu.ahs.get(4..(3 + length).min(pdu.ahs.len())) {
                cdb.extend_from_slice(extra);
            }
        }
        let mut aborted = task.aborted.subscribe();
        let data = if write && expected > WRITE_BYTES_MAX {
            Err(Sense::invalid_cdb(0, None))
        } else if write {
            let wanted = self.data_out_wanted(&pdu);
            match self.collect(&pdu, wanted, data_out, &mut aborted).await {
                Ok(data) => Ok(data),
                Err(Collect::Aborted) => {
                    if counted {
                        self.in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                    return;
                }
                Err(Collect::Broken(why)) => {
                    tracing::warn!(nexus = %self.nexus, itt, why, "Data-Out out of sequence; command failed");
                    Err(Sense::new(sense::key::ABORTED_COMMAND, 0x4b, 0x00))
                }
            }
        } else {
            Ok(Bytes::new())
        };
        let received = data.as_ref().map(|data| data.len()).unwrap_or(0);
        let reply = match data {
            Err(sense) => Reply::check(sense, false),
            Ok(data) => match self.target.as_ref().and_then(|target| target.luns.get(&task.lun)) {
                Some(unit) => {
                    let command = Command {
                        cdb: &cdb,
                        data,
                        nexus: &self.nexus,
                        port: &self.port,
                        luns: &self.luns,
                        expected_length: expected,
                    };
                    if cdb[0] == sanitize::OPCODE {
                        // The sanitize goes on in the background; an abort
                        // or a lost connection only stops the waiting.
                        tokio::select! {
                            reply = unit.execute(command) => reply,
                            _ = aborted.wait_for(|aborted| *aborted) => {
                                if counted {
                                    self.in_flight.fetch_sub(1, Ordering::AcqRel);
                                }
                                return;
                            }
                        }
                    } else {
                        unit.execute_unless_aborted(command, Some(aborted)).await
                    }
                }
                None => no_such_unit(&cdb, &self.luns),
            },
        };
        if counted {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if write {
            self.registry.counters.write_bytes.fetch_add(received as u64, Ordering::Relaxed);
        }
        self.respond(task, itt, &pdu, &cdb, reply, read, write, expected);
    }

    /// The data-out bytes to gather: what the CDB asks for, at most the
    /// expected length (none for a command without the W bit).
    fn data_out_wanted(&self, pdu: &Pdu) -> usize {
        let expected = pdu.u32_at(20);
        if pdu.flags() & 0x20 == 0 || expected > WRITE_BYTES_MAX {
            return 0;
        }
        let asked = scsi::data_out_bytes(&pdu.bhs[32..48], self.block_size(pdu)).unwrap_or(0);
        asked.min(expected as usize)
    }

    /// Gathers a write's data: immediate, unsolicited, then solicited by
    /// R2T one burst at a time, checking DataSN within each sequence. More
    /// than `wanted` (the expected length exceeds what the CDB asks) is
    /// taken and dropped.
    async fn collect(
        &self,
        pdu: &Pdu,
        wanted: usize,
        data_out: Option<mpsc::Receiver<Pdu>>,
        aborted: &mut watch::Receiver<bool>,
    ) -> Result<Bytes, Collect> {
        let immediate = pdu.data.len().min(wanted);
        let Some(mut data_out) = data_out else { return Ok(pdu.data.slice(..immediate)) };
        let mut buffer = BytesMut::zeroed(wanted);
        buffer[..immediate].copy_from_slice(&pdu.data[..immediate]);
        let mut received = immediate;
        let expected = pdu.u32_at(20) as usize;
        let unsolicited_end = if pdu.final_bit() || self.params.initial_r2t {
            pdu.data.len()
        } else {
            (self.params.first_burst as usize).min(expected)
        };
        // Unsolicited Data-Out, up to the first burst or its final PDU.
        let mut sent = pdu.data.len();
        let mut data_sn = 0u32;
        while sent < unsolicited_end && received < wanted {
            let piece = self.next_data_out(&mut data_out, aborted).await.ok_or(Collect::Aborted)?;
            if piece.u32_at(36) != data_sn {
                return Err(Collect::Broken("DataSN"));
            }
            data_sn += 1;
            let last = piece.final_bit();
            sent += piece.data.len();
            received += place(&mut buffer, &piece);
            if last {
                break;
            }
        }
        let mut r2t_sn = 0u32;
        while received < wanted {
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            let length = (self.params.max_burst as usize).min(wanted - received);
            let mut r2t = Pdu::new(Opcode::ReadyToTransfer);
            r2t.set_flags(0x80);
            r2t.bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
            r2t.set_initiator_task_tag(pdu.initiator_task_tag());
            r2t.set_u32_at(20, tag);
            r2t.set_u32_at(36, r2t_sn);
            r2t.set_u32_at(40, received as u32);
            r2t.set_u32_at(44, length as u32);
            r2t_sn += 1;
            self.send(r2t, Numbering::Peek).await;
            let mut burst = 0;
            let mut data_sn = 0u32;
            while burst < length {
                let piece = self.next_data_out(&mut data_out, aborted).await.ok_or(Collect::Aborted)?;
                if piece.u32_at(20) != tag {
                    // Unsolicited data past what was needed.
                    continue;
                }
                if piece.u32_at(36) != data_sn {
                    return Err(Collect::Broken("DataSN"));
                }
                data_sn += 1;
                let last = piece.final_bit();
                let placed = place(&mut buffer, &piece);
                if placed == 0 && !piece.data.is_empty() {
                    return Err(Collect::Broken("buffer offset"));
                }
                burst += placed;
                if last {
                    break;
                }
            }
            if burst == 0 {
                return Err(Collect::Broken("empty burst"));
            }
            received += burst;
        }
        Ok(buffer.freeze())
    }

    async fn next_data_out(
        &self,
        data_out: &mut mpsc::Receiver<Pdu>,
        aborted: &mut watch::Receiver<bool>,
    ) -> Option<Pdu> {
        if *aborted.borrow() {
            return None;
        }
        tokio::select! {
            piece = data_out.recv() => piece,
            _ = aborted.changed() => None,
        }
    }

    /// Sends the command's Data-In and status, unless it was aborted
    /// (decided under the task's lock: an abort answered "complete" is
    /// never followed by the task's status).
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        task: &Task,
        itt: u32,
        pdu: &Pdu,
        cdb: &[u8],
        reply: Reply,
        read: bool,
        write: bool,
        expected: u32,
    ) {
        let mut stage = task.stage.lock().expect("task stage");
        if *stage == Stage::Aborted {
            return;
        }
        *stage = Stage::Answered;
        let expected = expected as usize;
        let mut response = Pdu::new(Opcode::ScsiResponse);
        response.set_initiator_task_tag(itt);
        response.bhs[3] = reply.status;
        let mut flags = 0x80u8;
        if reply.status == status::GOOD && !reply.data.is_empty() && read && expected > 0 {
            // Data-In, status in the last PDU.
            let data = reply.data.slice(..reply.data.len().min(expected));
            let (residual_flag, residual) = residual(reply.data.len(), expected);
            self.registry.counters.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            let chunk = (self.params.initiator_max_recv as usize).max(512);
            let burst = (self.params.max_burst as usize).max(chunk);
            let mut offset = 0;
            let mut data_sn = 0u32;
            while offset < data.len() || data_sn == 0 {
                let end = (offset + chunk).min(data.len());
                let end = end.min((offset / burst + 1) * burst);
                let last = end == data.len();
                let mut data_in = Pdu::new(Opcode::DataIn);
                let mut bits = 0u8;
                if last || end.is_multiple_of(burst) {
                    bits |= 0x80;
                }
                data_in.bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
                data_in.set_initiator_task_tag(itt);
                data_in.set_u32_at(20, NO_TAG);
                data_in.set_u32_at(36, data_sn);
                data_in.set_u32_at(40, offset as u32);
                data_in.data = data.slice(offset..end);
                data_sn += 1;
                offset = end;
                if last {
                    bits |= 0x01 | residual_flag;
                    data_in.bhs[3] = reply.status;
                    data_in.set_u32_at(44, residual);
                    data_in.set_flags(bits);
                    let _ = self.out.send(Out::Pdu(data_in, Numbering::Status));
                    return;
                }
                data_in.set_flags(bits);
                let _ = self.out.send(Out::Pdu(data_in, Numbering::Window));
            }
            return;
        }
        let wanted =
            if write { scsi::data_out_bytes(cdb, self.block_size(pdu)).unwrap_or(expected) } else { reply.data.len() };
        let (residual_flag, residual) = residual(wanted, expected);
        flags |= residual_flag;
        response.set_flags(flags);
        response.set_u32_at(44, residual);
        if let Some(sense) = reply.sense {
            let mut data = BytesMut::with_capacity(2 + sense.len());
            data.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            data.extend_from_slice(&sense);
            response.data = data.freeze();
        }
        let _ = self.out.send(Out::Pdu(response, Numbering::Status));
    }

    fn block_size(&self, pdu: &Pdu) -> u32 {
        self.target
            .as_ref()
            .and_then(|target| target.luns.get(&scsi::decode_lun(pdu.lun())))
            .map(|unit| unit.device().block_size())
            .unwrap_or(512)
    }

    async fn task_management(self: Arc<Self>, pdu: Pdu) {
        let function = pdu.flags() & 0x7f;
        let lun = scsi::decode_lun(pdu.lun());
        let referenced = pdu.u32_at(20);
        let response = match function {
            // ABORT TASK
            1 => {
                let task = self.tasks.lock().expect("tasks").get(&referenced).cloned();
                match task {
                    Some(task) if self.abort(std::slice::from_ref(&task)).await == 1 => 0,
                    // Answered already, or never seen.
                    _ => 1,
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 4 | 5 => {
                let unit = self.target.as_ref().and_then(|target| target.luns.get(&lun).cloned());
                match unit {
                    None => 2,
                    Some(unit) => {
                        let tasks: Vec<Arc<Task>> = self
                            .tasks
                            .lock()
                            .expect("tasks")
                            .values()
                            .filter(|task| task.lun == lun)
                            .cloned()
                            .collect();
                        self.abort(&tasks).await;
                        if function == 5 {
                            unit.reset(self.port.relative_port).await;
                        }
                        0
                    }
                }
            }
            // TARGET WARM RESET, TARGET COLD RESET
            6 | 7 => {
                let tasks: Vec<Arc<Task>> = self.tasks.lock().expect("tasks").values().cloned().collect();
                self.abort(&tasks).await;
                if let Some(target) = &self.target {
                    let resets = target.luns.values().map(|unit| unit.reset(self.port.relative_port));
                    futures::future::join_all(resets).await;
                }
                0
            }
            // CLEAR ACA: ACA is not offered.
            3 => 5,
            // TASK REASSIGN: needs error recovery level 2.
            8 => 4,
            _ => 5,
        };
        let mut reply = Pdu::new(Opcode::TaskManagementResponse);
        reply.set_flags(0x80);
        reply.bhs[2] = response;
        reply.set_initiator_task_tag(pdu.initiator_task_tag());
        self.send(reply, Numbering::Status).await;
        if function == 7 {
            let _ = self.out.send(Out::Close);
        }
    }

    /// Aborts the tasks not yet answered and waits until each has stopped
    /// (none answers after the task management response). Returns how many
    /// it aborted.
    async fn abort(&self, tasks: &[Arc<Task>]) -> usize {
        let mut count = 0;
        for task in tasks {
            let mut stage = task.stage.lock().expect("task stage");
            if *stage == Stage::Running {
                *stage = Stage::Aborted;
                count += 1;
                let _ = task.aborted.send(true);
            }
        }
        for task in tasks {
            loop {
                let notified = task.done.notified();
                if task.finished.load(Ordering::Acquire) {
                    break;
                }
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
            }
        }
        count
    }

    async fn text(&self, pdu: Pdu) {
        let ttt = pdu.u32_at(20);
        let chunk = (self.params.initiator_max_recv as usize).max(512);
        let body: Bytes = if ttt != NO_TAG {
            // The initiator asks for the rest of a long response.
            let rest = self.text_rest.lock().expect("text").take();
            match rest {
                Some((tag, rest)) if tag == ttt => rest,
                _ => {
                    self.reject(reject::INVALID_PDU_FIELD, &pdu.bhs).await;
                    return;
                }
            }
        } else {
            let pairs = match text::parse(&pdu.data) {
                Ok(pairs) => pairs,
                Err(error) => {
                    tracing::info!(%error, "bad Text request");
                    self.reject(reject::PROTOCOL_ERROR, &pdu.bhs).await;
                    return;
                }
            };
            let mut answers: Vec<(String, String)> = Vec::new();
            for (key, value) in pairs {
                if key == "SendTargets" {
                    for target in self.registry.targets() {
                        let wanted = match self.kind {
                            SessionType::Discovery => value == "All" || value == target.name,
                            SessionType::Normal => {
                                Some(&target.name) == self.target.as_ref().map(|t| &t.name)
                                    && (value.is_empty() || value == "All" || value == target.name)
                            }
                        };
                        if !wanted {
                            continue;
                        }
                        answers.push(("TargetName".into(), target.name.clone()));
                        for portal in self.registry.portals() {
                            answers.push(("TargetAddress".into(), portal.target_address()));
                        }
                    }
                } else {
                    answers.push((key, "NotUnderstood".into()));
                }
            }
            // Several TargetName/TargetAddress pairs: encode without the
            // duplicate-key check the parser makes.
            let mut body = Vec::new();
            for (key, value) in answers {
                body.extend_from_slice(key.as_bytes());
                body.push(b'=');
                body.extend_from_slice(value.as_bytes());
                body.push(0);
            }
            body.into()
        };
        let mut reply = Pdu::new(Opcode::TextResponse);
        reply.set_initiator_task_tag(pdu.initiator_task_tag());
        if body.len() > chunk {
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            reply.set_flags(0x40);
            reply.set_u32_at(20, tag);
            reply.data = body.slice(..chunk);
            *self.text_rest.lock().expect("text") = Some((tag, body.slice(chunk..)));
        } else {
            reply.set_flags(0x80);
            reply.set_u32_at(20, NO_TAG);
            reply.data = body;
        }
        self.send(reply, Numbering::Status).await;
    }
}

enum Collect {
    Aborted,
    Broken(&'static str),
}

/// Places a Data-Out PDU's data at its buffer offset; returns its length
/// (0 when it falls outside the buffer).
fn place(buffer: &mut BytesMut, piece: &Pdu) -> usize {
    let offset = piece.u32_at(40) as usize;
    if offset >= buffer.len() {
        return 0;
    }
    let end = (offset + piece.data.len()).min(buffer.len());
    buffer[offset..end].copy_from_slice(&piece.data[..end - offset]);
    end - offset
}

/// The residual flags (O 0x04, U 0x02) and count for `wanted` bytes
/// against `expected`.
fn residual(wanted: usize, expected: usize) -> (u8, u32) {
    if wanted > expected {
        (0x04, (wanted - expected) as u32)
    } else if wanted < expected {
        (0x02, (expected - wanted) as u32)
    } else {
        (0, 0)
    }
}

/// A command to a logical unit number the target does not have.
fn no_such_unit(cdb: &[u8], luns: &[u64]) -> Reply {
    match cdb.first() {
        Some(0xa0) if cdb.len() >= 12 => {
            scsi::report_luns(cdb, luns).unwrap_or_else(|sense| Reply::check(sense, false))
        }
        Some(0x12) if cdb.len() >= 6 => {
            let mut data = vec![0u8; 36];
            data[0] = 0x7f; // not capable of supporting a unit here
            data[3] = 0x02;
            data[4] = 31;
            data.truncate(usize::from(u16::from_be_bytes([cdb[3], cdb[4]])));
            Reply::good(data)
        }
        Some(0x03) => {
            let mut data = Sense::lun_not_supported().fixed();
            data.truncate(usize::from(*cdb.get(4).unwrap_or(&0)));
            Reply::good(data)
        }
        _ => Reply::check(Sense::new(sense::key::ILLEGAL_REQUEST, 0x25, 0x00), false),
    }
}
