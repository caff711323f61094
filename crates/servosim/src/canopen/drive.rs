//! One simulated CiA 402 drive on CANopen: NMT slave and heartbeat producer (CiA 301 v4.2,
//! 7.2.8), the CiA 402 state machine driven by the controlword (CiA 402-2, "state
//! machine"), the TPDO and EMCY producers, and the values behind its object dictionary.
//!
//! Sans-IO: every method takes the current [`Instant`] (for schedules) and the model time
//! `t_ms` (for values), and pushes the frames to send into `out`.
//!
//! A node starts in mode 8 (cyclic synchronous position) and its axis follows the
//! repeating move of [`crate::model`], as if a PLC streamed the set-points; it stands
//! outside operation enabled (the motion clock stops) and resumes where it stopped. Writing
//! mode 1 (profile position) or 3 (profile velocity) to 0x6060 hands the axis to the
//! commands: it stops where it is at that instant and from then on does what the
//! controlword and the set-points say, as the Modbus units do once commanded
//! ([`crate::drive`]): a rising edge of controlword bit 4 in operation enabled and profile
//! position latches 0x607A (relative to the present position with bit 6) and 0x6081 (0:
//! [`DEFAULT_PROFILE_VELOCITY_UM_S`]), sets set-point acknowledge (statusword bit 12)
//! until bit 4 falls, and the axis runs to the target, where target reached (bit 10) comes
//! on; in profile velocity it runs at 0x60FF. Halt (bit 8) holds the axis (a profile
//! position move goes on when it is cleared); leaving operation enabled, a fault or a mode
//! change ends a move. A node never put in a profile mode behaves exactly as before.

use std::time::{Duration, Instant};

use super::od::{self, AbortCode, Entry, Object, ProcessValues, TPDO_COUNT};
use super::sdo::{self, Dictionary, SdoServer};
use super::{cob, Frame};
pub use crate::cia402::Cia402State;
use crate::cia402::{self, cw};
use crate::drive::{DEFAULT_PROFILE_VELOCITY_UM_S, SW_SET_POINT_ACKNOWLEDGE, SW_TARGET_REACHED};
use crate::model::{self, Commanded, Sample};
use crate::motion::Segment;

/// How the TPDOs are triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TpdoMode {
    /// Transmission type 0xFE, every event timer (the `--period`).
    #[default]
    Timer,
    /// Transmission type 1, on every SYNC.
    Sync,
}

/// The power-on values of a node (from the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeDefaults {
    /// 0x1017 producer heartbeat time, ms; 0 = no heartbeat.
    pub heartbeat_ms: u16,
    pub tpdo: TpdoMode,
    /// Event timer of the TPDOs in [`TpdoMode::Timer`], ms.
    pub period_ms: u16,
    /// Start in Operation enabled (as if a PLC had enabled the drive) rather than in
    /// Switch on disabled.
    pub start_enabled: bool,
}

impl Default for NodeDefaults {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            tpdo: TpdoMode::Timer,
            period_ms: 10,
            start_enabled: true,
        }
    }
}

/// NMT commands (byte 0 of a frame on COB-ID 0x000; CiA 301 v4.2, 7.2.8.3.1).
pub mod nmt {
    pub const START: u8 = 0x01;
    pub const STOP: u8 = 0x02;
    pub const ENTER_PRE_OPERATIONAL: u8 = 0x80;
    pub const RESET_NODE: u8 = 0x81;
    pub const RESET_COMMUNICATION: u8 = 0x82;
}

/// The NMT state of a node (after initialisation, which sends the boot-up message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NmtState {
    PreOperational,
    Operational,
    Stopped,
}

impl NmtState {
    /// The state byte of a heartbeat (CiA 301 v4.2, 7.2.8.3.2.1).
    pub fn heartbeat_byte(self) -> u8 {
        match self {
            NmtState::PreOperational => 0x7F,
            NmtState::Operational => 0x05,
            NmtState::Stopped => 0x04,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NmtState::PreOperational => "pre_operational",
            NmtState::Operational => "operational",
            NmtState::Stopped => "stopped",
        }
    }
}

/// The communication parameters of one TPDO (1800+k) and its schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tpdo {
    cob_id: u32,
    transmission_type: u8,
    event_timer_ms: u16,
    /// SYNCs counted towards transmission type n.
    syncs: u8,
    /// Next send of a timer-driven TPDO (only while operational).
    due: Option<Instant>,
}

impl Tpdo {
    fn power_on(node: u8, k: usize, defaults: &NodeDefaults) -> Self {
        let base = [cob::TPDO1, cob::TPDO2, cob::TPDO3, cob::TPDO4][k];
        let cob_id = u32::from(base + u16::from(node));
        let (cob_id, transmission_type, event_timer_ms) = if od::TPDO_MAPPINGS[k].is_empty() {
            (od::COB_ID_INVALID | cob_id, od::TRANSMISSION_EVENT, 0)
        } else {
            match defaults.tpdo {
                TpdoMode::Timer => (cob_id, od::TRANSMISSION_EVENT, defaults.period_ms),
                TpdoMode::Sync => (cob_id, od::TRANSMISSION_SYNC_EVERY, 0),
            }
        };
        Self {
            cob_id,
            transmission_type,
            event_timer_ms,
            syncs: 0,
            due: None,
        }
    }

    fn is_valid(&self, k: usize) -> bool {
        self.cob_id & od::COB_ID_INVALID == 0 && !od::TPDO_MAPPINGS[k].is_empty()
    }

    /// Transmission types 0xFE and 0xFF are event-driven; the event timer sends them.
    fn is_timer_driven(&self) -> bool {
        self.transmission_type >= 0xFE && self.event_timer_ms > 0
    }

    /// Transmission types 0 (acyclic synchronous, sent at every SYNC here since the values
    /// always change) and 1-240 (every n-th SYNC).
    fn is_sync_driven(&self) -> bool {
        self.transmission_type <= 240
    }
}

/// What a node shows at one instant: for `truth` and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeTruth {
    pub node: u8,
    pub t_ms: u32,
    pub motion_ms: u32,
    pub sample: Sample,
    pub statusword: u16,
    pub error_code: u16,
    pub nmt: NmtState,
    pub state: Cia402State,
    pub silent: bool,
}

/// A latched profile position set-point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SetPoint {
    target_um: i32,
    speed_um_s: u32,
}

/// The axis of a node in the commands' hands (a profile mode was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Axis {
    segment: Segment,
    set_point: Option<SetPoint>,
    /// The profile position move to `set_point` goes on (halt only pauses it).
    in_progress: bool,
    /// Statusword bit 12 in profile position mode.
    acknowledged: bool,
}

/// One simulated node.
#[derive(Debug, Clone)]
pub struct Node {
    id: u8,
    defaults: NodeDefaults,
    nmt: NmtState,
    silent: bool,
    heartbeat_ms: u16,
    next_heartbeat: Option<Instant>,
    tpdos: [Tpdo; TPDO_COUNT],
    state: Cia402State,
    controlword: u16,
    mode: i8,
    target_position: i32,
    /// 0x6081, 0.001 mm/s.
    profile_velocity: u32,
    /// 0x60FF, 0.001 mm/s.
    target_velocity: i32,
    /// `None` until a profile mode is written: the repeating move.
    axis: Option<Axis>,
    /// SDO downloads begun (initiate download requests answered) and applied (written).
    downloads: u64,
    applied: u64,
    /// Every download is answered with this abort code (the console's `abort N CODE`).
    abort: Option<u32>,
    error_code: u16,
    /// Model time spent outside Operation enabled in stretches already over.
    stopped_ms: u32,
    /// Model time at which the current stretch outside Operation enabled began.
    stopped_since: Option<u32>,
    sdo: SdoServer,
    tpdo_sent: u64,
    /// RPDO1 (controlword): 1400:01 and 1400:02.
    rpdo_cob_id: u32,
    rpdo_transmission_type: u8,
    /// A synchronous RPDO's controlword, acted on at the next SYNC (CiA 301 v4.2, 7.2.2.2).
    rpdo_latched: Option<u16>,
    /// RPDO frames taken (valid COB-ID, operational, long enough).
    rpdos: u64,
    /// Number of the SYNC (counted by the bus since start) at which the last set-point
    /// that came by RPDO was taken: tests check a group started in one cycle.
    started_at_sync: Option<u64>,
}

impl Node {
    /// A node at power-on, model time 0, before its boot-up message ([`Self::power_on`]).
    /// `fault`: start in Fault with this error code.
    pub fn new(id: u8, defaults: NodeDefaults, fault: Option<u16>, silent: bool) -> Self {
        let mut node = Self {
            id,
            defaults,
            nmt: NmtState::PreOperational,
            silent,
            heartbeat_ms: defaults.heartbeat_ms,
            next_heartbeat: None,
            tpdos: std::array::from_fn(|k| Tpdo::power_on(id, k, &defaults)),
            state: Cia402State::SwitchOnDisabled,
            controlword: 0,
            mode: model::MODE_CYCLIC_SYNC_POSITION as i8,
            target_position: 0,
            profile_velocity: 0,
            target_velocity: 0,
            axis: None,
            downloads: 0,
            applied: 0,
            abort: None,
            error_code: 0,
            stopped_ms: 0,
            // Not moving since model time 0 until the state says otherwise.
            stopped_since: Some(0),
            sdo: SdoServer::new(),
            tpdo_sent: 0,
            rpdo_cob_id: u32::from(cob::RPDO1 + u16::from(id)),
            rpdo_transmission_type: od::TRANSMISSION_SYNC_EVERY,
            rpdo_latched: None,
            rpdos: 0,
            started_at_sync: None,
        };
        node.reset_application(0);
        if let Some(code) = fault.filter(|&c| c != 0) {
            node.error_code = code;
            node.set_state(Cia402State::Fault, 0);
        }
        node
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn nmt(&self) -> NmtState {
        self.nmt
    }

    pub fn state(&self) -> Cia402State {
        self.state
    }

    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// TPDO frames this node has sent.
    pub fn tpdo_sent(&self) -> u64 {
        self.tpdo_sent
    }

    /// SDO downloads begun (each initiate download request answered, an abort included).
    pub fn downloads(&self) -> u64 {
        self.downloads
    }

    /// SDO downloads whose value was written into the dictionary.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// RPDO frames this node took.
    pub fn rpdos(&self) -> u64 {
        self.rpdos
    }

    /// The SYNC number at which the last set-point sent by RPDO was taken.
    pub fn started_at_sync(&self) -> Option<u64> {
        self.started_at_sync
    }

    /// The COB-ID RPDO1 listens on, while it is valid.
    pub fn rpdo_cob(&self) -> Option<u16> {
        (self.rpdo_cob_id & od::COB_ID_INVALID == 0).then_some((self.rpdo_cob_id & 0x7FF) as u16)
    }

    /// An RPDO1 frame (the controlword): acted on at once (transmission type 254/255) or
    /// at the next SYNC (0-240). Only in operational (CiA 301 v4.2, 7.3.2.2.3); a frame
    /// shorter than the mapping is ignored.
    pub fn handle_rpdo(&mut self, data: &[u8], t_ms: u32, out: &mut Vec<Frame>) {
        if self.silent || self.nmt != NmtState::Operational {
            return;
        }
        let Some(&[lo, hi]) = data.get(..2) else {
            return;
        };
        self.rpdos += 1;
        let word = u16::from_le_bytes([lo, hi]);
        if self.rpdo_transmission_type <= 240 {
            self.rpdo_latched = Some(word);
        } else {
            self.write_controlword(word, t_ms, out);
        }
    }

    /// True once a profile mode was written: the axis follows the commands.
    pub fn is_commanded(&self) -> bool {
        self.axis.is_some()
    }

    /// `Some(code)`: every SDO download from now on is answered with that abort code and
    /// changes nothing; `None` answers them normally again.
    pub fn set_abort(&mut self, code: Option<u32>) {
        self.abort = code;
    }

    /// Finishes initialisation: boot-up message, pre-operational, and the EMCY of a fault
    /// it starts with (a drive that is faulted at power-on says so once it may).
    pub fn power_on(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.boot(now, out);
        if self.state == Cia402State::Fault {
            self.emcy(self.error_code, out);
        }
    }

    /// The boot-up message and a fresh start of the heartbeat.
    fn boot(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.nmt = NmtState::PreOperational;
        self.sdo.reset();
        for t in &mut self.tpdos {
            t.due = None;
            t.syncs = 0;
        }
        self.next_heartbeat = after(now, self.heartbeat_ms);
        self.send(out, cob::HEARTBEAT, &[0x00]);
    }

    /// Resets the communication area (0x1000-0x1FFF) to its power-on values, as NMT
    /// reset communication and reset node do (CiA 301 v4.2, 7.3.2.2.1).
    fn reset_communication(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.heartbeat_ms = self.defaults.heartbeat_ms;
        self.tpdos = std::array::from_fn(|k| Tpdo::power_on(self.id, k, &self.defaults));
        self.rpdo_cob_id = u32::from(cob::RPDO1 + u16::from(self.id));
        self.rpdo_transmission_type = od::TRANSMISSION_SYNC_EVERY;
        self.rpdo_latched = None;
        self.boot(now, out);
    }

    /// Resets the application (0x2000-0x9FFF): fault cleared, the drive in its start
    /// state, controlword, mode and target at their power-on values. The motion clock goes
    /// on, so the axis does not jump.
    fn reset_application(&mut self, t_ms: u32) {
        self.error_code = 0;
        let (state, controlword) = if self.defaults.start_enabled {
            (Cia402State::OperationEnabled, cw::ENABLED)
        } else {
            (Cia402State::SwitchOnDisabled, 0)
        };
        self.set_state(state, t_ms);
        self.controlword = controlword;
        self.mode = model::MODE_CYCLIC_SYNC_POSITION as i8;
        self.target_position = 0;
        self.profile_velocity = 0;
        self.target_velocity = 0;
        // Back in mode 8: the axis follows the repeating move again.
        self.axis = None;
    }

    /// NMT reset node, from the bus or the console's `reboot`.
    pub fn reset_node(&mut self, now: Instant, t_ms: u32, out: &mut Vec<Frame>) {
        self.reset_application(t_ms);
        self.reset_communication(now, out);
    }

    /// Carries out an NMT command addressed to this node (or to all).
    pub fn handle_nmt(&mut self, command: u8, now: Instant, t_ms: u32, out: &mut Vec<Frame>) {
        if self.silent {
            return;
        }
        match command {
            // Already operational: nothing changes (the TPDO cycle goes on).
            nmt::START if self.nmt != NmtState::Operational => {
                self.nmt = NmtState::Operational;
                for k in 0..TPDO_COUNT {
                    self.arm_tpdo(k, now);
                }
            }
            nmt::STOP => {
                self.nmt = NmtState::Stopped;
                self.sdo.reset();
                self.disarm_tpdos();
            }
            nmt::ENTER_PRE_OPERATIONAL => {
                self.nmt = NmtState::PreOperational;
                self.disarm_tpdos();
            }
            nmt::RESET_NODE => self.reset_node(now, t_ms, out),
            nmt::RESET_COMMUNICATION => self.reset_communication(now, out),
            // Unknown commands are ignored, as by any NMT slave.
            _ => {}
        }
    }

    /// Answers an SDO request (the data of a frame on 0x600 + node). `Some(true)` when
    /// the answer is an abort, `None` when nothing was sent.
    pub fn handle_sdo(
        &mut self,
        request: &[u8],
        now: Instant,
        t_ms: u32,
        out: &mut Vec<Frame>,
    ) -> Option<bool> {
        // Not in STOPPED (CiA 301 v4.2, 7.3.2.2.2: only NMT and heartbeat there).
        if self.silent || self.nmt == NmtState::Stopped {
            return None;
        }
        // Initiate download (ccs 1, CiA 301 v4.2, 7.2.4.3.3): one more download begun.
        let initiates_download = request.first().is_some_and(|b| b >> 5 == 1);
        if initiates_download {
            self.downloads += 1;
            if let Some(code) = self.abort {
                // Injected: refused before the dictionary sees it, nothing applied.
                let mux = match request {
                    [_, lo, hi, sub, ..] => (u16::from_le_bytes([*lo, *hi]), *sub),
                    _ => (0, 0),
                };
                self.sdo.reset();
                self.send(out, cob::SDO_TX, &sdo::abort_frame(mux, AbortCode(code)));
                return Some(true);
            }
        }
        // The server is taken out for the call so that the dictionary can borrow the
        // rest of the node mutably.
        let mut server = std::mem::take(&mut self.sdo);
        let mut frames = Vec::new();
        let answer = server.handle(
            request,
            &mut NodeDictionary {
                node: self,
                now,
                t_ms,
                out: &mut frames,
            },
        );
        self.sdo = server;
        let answer = answer?;
        self.send(out, cob::SDO_TX, &answer);
        // Frames the write caused (an EMCY after a fault reset) follow the answer.
        out.append(&mut frames);
        Some(sdo::is_abort(&answer))
    }

    /// SYNC number `sync` arrived: acts on a latched RPDO, then sends the synchronous
    /// TPDOs that are due, all from one sample.
    pub fn handle_sync(&mut self, sync: u64, t_ms: u32, out: &mut Vec<Frame>) {
        if self.silent || self.nmt != NmtState::Operational {
            return;
        }
        if let Some(word) = self.rpdo_latched.take() {
            if self.write_controlword(word, t_ms, out) {
                self.started_at_sync = Some(sync);
            }
        }
        let mut due = [false; TPDO_COUNT];
        for (k, t) in self.tpdos.iter_mut().enumerate() {
            if !t.is_valid(k) || !t.is_sync_driven() {
                continue;
            }
            t.syncs = t.syncs.saturating_add(1);
            if t.syncs >= t.transmission_type.max(1) {
                t.syncs = 0;
                due[k] = true;
            }
        }
        self.send_tpdos(due, t_ms, out);
    }

    /// Sends what is due at `now`: heartbeat, timer-driven TPDOs.
    pub fn poll(&mut self, now: Instant, t_ms: u32, out: &mut Vec<Frame>) {
        if self.silent {
            return;
        }
        if let Some(due) = self.next_heartbeat.filter(|&d| d <= now) {
            self.next_heartbeat = Some(advance(due, self.heartbeat_ms, now));
            let state = self.nmt.heartbeat_byte();
            self.send(out, cob::HEARTBEAT, &[state]);
        }
        if self.nmt != NmtState::Operational {
            return;
        }
        let mut due = [false; TPDO_COUNT];
        for (k, t) in self.tpdos.iter_mut().enumerate() {
            if let Some(d) = t.due.filter(|&d| d <= now) {
                t.due = Some(advance(d, t.event_timer_ms, now));
                due[k] = true;
            }
        }
        self.send_tpdos(due, t_ms, out);
    }

    /// When [`Self::poll`] has something to send next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.silent {
            return None;
        }
        let tpdos = self.tpdos.iter().filter_map(|t| t.due);
        self.next_heartbeat.into_iter().chain(tpdos).min()
    }

    /// `silent`: sends nothing at all and ignores everything; resuming carries on where
    /// it is (no boot-up), with its schedules restarted from `now`.
    pub fn set_silent(&mut self, silent: bool, now: Instant) {
        if self.silent == silent {
            return;
        }
        self.silent = silent;
        if !silent {
            self.next_heartbeat = after(now, self.heartbeat_ms);
            self.disarm_tpdos();
            for k in 0..TPDO_COUNT {
                self.arm_tpdo(k, now);
            }
        }
    }

    /// Puts the drive into Fault with `code` (a new code while faulted replaces the old
    /// one): 0x603F = code, 0x1001 = generic error, EMCY. Code 0 clears the fault.
    pub fn inject_fault(&mut self, code: u16, t_ms: u32, out: &mut Vec<Frame>) {
        if code == 0 {
            return self.clear_fault(t_ms, out);
        }
        self.error_code = code;
        self.set_state(Cia402State::Fault, t_ms);
        self.replan(t_ms);
        self.emcy(code, out);
    }

    /// The console's `clear`: the fault goes (EMCY error reset) and the drive returns to
    /// its start state, Operation enabled unless started `--disabled`.
    pub fn clear_fault(&mut self, t_ms: u32, out: &mut Vec<Frame>) {
        if self.state != Cia402State::Fault {
            return;
        }
        self.error_code = 0;
        // A commanded axis never starts moving on its own: it must be enabled again.
        let state = if self.defaults.start_enabled && !self.is_commanded() {
            Cia402State::OperationEnabled
        } else {
            Cia402State::SwitchOnDisabled
        };
        self.set_state(state, t_ms);
        self.replan(t_ms);
        self.emcy(0, out);
    }

    /// Model time on the axis's motion clock: model time minus the time spent outside
    /// Operation enabled.
    pub fn motion_ms(&self, t_ms: u32) -> u32 {
        let current = self.stopped_since.map_or(0, |s| t_ms.wrapping_sub(s));
        t_ms.wrapping_sub(self.stopped_ms).wrapping_sub(current)
    }

    fn model_drive(&self, t_ms: u32) -> model::DriveState {
        let repeating = od::model_drive(
            self.motion_ms(t_ms),
            self.state == Cia402State::OperationEnabled,
            self.error_code,
        );
        match self.axis {
            None => repeating,
            Some(axis) => model::DriveState {
                error_code: self.error_code,
                commanded: Some(Commanded {
                    state: self.state,
                    segment: axis.segment,
                    set_point: axis.set_point.map(|s| s.target_um),
                    mode_bits: self.mode_bits(&axis, t_ms),
                }),
                ..repeating
            },
        }
    }

    /// The statusword at `t_ms`: the state coding, plus bits 10 and 12 in operation
    /// enabled once commanded.
    pub fn statusword(&self, t_ms: u32) -> u16 {
        let bits = match self.axis {
            Some(axis) if self.state == Cia402State::OperationEnabled => {
                self.mode_bits(&axis, t_ms)
            }
            _ => 0,
        };
        self.state.statusword() | bits
    }

    /// Statusword bits 10 and 12 of a commanded axis (as the Modbus units show them).
    fn mode_bits(&self, axis: &Axis, t_ms: u32) -> u16 {
        if self.mode == cia402::MODE_PROFILE_POSITION {
            let reached = axis
                .set_point
                .is_none_or(|s| axis.segment.position_um(t_ms) == s.target_um);
            let mut bits = 0;
            if reached {
                bits |= SW_TARGET_REACHED;
            }
            if axis.acknowledged {
                bits |= SW_SET_POINT_ACKNOWLEDGE;
            }
            bits
        } else if self.mode == cia402::MODE_PROFILE_VELOCITY {
            // No ramps: the target velocity is reached at once; bit 12 is speed zero.
            let mut bits = SW_TARGET_REACHED;
            if axis.segment.is_standing(t_ms) {
                bits |= SW_SET_POINT_ACKNOWLEDGE;
            }
            bits
        } else {
            SW_TARGET_REACHED
        }
    }

    /// A mode of operation written: a profile mode hands the axis to the commands (it
    /// stops where the repeating move had it, rounded as 0x6064 shows it).
    fn set_mode(&mut self, mode: i8, t_ms: u32) {
        let changed = mode != self.mode;
        if self.axis.is_none()
            && (mode == cia402::MODE_PROFILE_POSITION || mode == cia402::MODE_PROFILE_VELOCITY)
        {
            let at = self.process_values(t_ms).position;
            self.axis = Some(Axis {
                segment: Segment::hold(at, t_ms),
                set_point: None,
                in_progress: false,
                acknowledged: false,
            });
        }
        self.mode = mode;
        if let Some(mut axis) = self.axis {
            if changed {
                // A move does not carry over into another mode, nor back.
                axis.in_progress = false;
            }
            let at = axis.segment.position_um(t_ms);
            self.axis = Some(self.plan(axis, at, t_ms));
        }
    }

    /// A new segment after an event (state, fault, target velocity).
    fn replan(&mut self, t_ms: u32) {
        if let Some(axis) = self.axis {
            let at = axis.segment.position_um(t_ms);
            self.axis = Some(self.plan(axis, at, t_ms));
        }
    }

    /// The segment from `at_um` at `t_ms` that the state, the mode and the set-point ask
    /// for (the same rules as the Modbus units').
    fn plan(&self, mut axis: Axis, at_um: i32, t_ms: u32) -> Axis {
        if self.state != Cia402State::OperationEnabled {
            axis.in_progress = false;
        }
        let halted = self.controlword & cw::HALT != 0;
        let runs = self.state == Cia402State::OperationEnabled && !halted;
        axis.segment = match (axis.set_point, runs) {
            (Some(s), true) if self.mode == cia402::MODE_PROFILE_POSITION && axis.in_progress => {
                Segment::toward(at_um, t_ms, s.target_um, s.speed_um_s)
            }
            (_, true) if self.mode == cia402::MODE_PROFILE_VELOCITY => {
                Segment::run(at_um, t_ms, i64::from(self.target_velocity))
            }
            _ => Segment::hold(at_um, t_ms),
        };
        axis
    }

    /// The process objects at `t_ms`, from one model sample.
    pub fn process_values(&self, t_ms: u32) -> ProcessValues {
        ProcessValues::at(self.id, t_ms, &self.model_drive(t_ms))
    }

    pub fn truth(&self, t_ms: u32) -> NodeTruth {
        NodeTruth {
            node: self.id,
            t_ms,
            motion_ms: self.motion_ms(t_ms),
            sample: model::drive_sample(self.id, t_ms, &self.model_drive(t_ms)),
            statusword: self.statusword(t_ms),
            error_code: self.error_code,
            nmt: self.nmt,
            state: self.state,
            silent: self.silent,
        }
    }

    fn set_state(&mut self, state: Cia402State, t_ms: u32) {
        let (was, is) = (
            self.state == Cia402State::OperationEnabled,
            state == Cia402State::OperationEnabled,
        );
        if was && !is {
            self.stopped_since = Some(t_ms);
        } else if !was && is {
            if let Some(since) = self.stopped_since.take() {
                self.stopped_ms = self.stopped_ms.wrapping_add(t_ms.wrapping_sub(since));
            }
        }
        self.state = state;
    }

    /// A controlword written (over SDO or RPDO): the CiA 402 state machine. True when it
    /// took a new profile position set-point.
    fn write_controlword(&mut self, value: u16, t_ms: u32, out: &mut Vec<Frame>) -> bool {
        let before = self.controlword;
        let state = cia402::on_controlword(self.state, before, value);
        self.controlword = value;
        if self.state == Cia402State::Fault && state != Cia402State::Fault {
            // Transition 15: the fault is gone; the drive must be enabled again.
            self.error_code = 0;
            self.emcy(0, out);
        }
        self.set_state(state, t_ms);
        let Some(mut axis) = self.axis else {
            return false;
        };
        let at = axis.segment.position_um(t_ms);
        if value & cw::NEW_SET_POINT == 0 {
            // The handshake's second half: bit 12 follows bit 4 down.
            axis.acknowledged = false;
        }
        let rising = value & cw::NEW_SET_POINT != 0 && before & cw::NEW_SET_POINT == 0;
        let taken = rising
            && self.state == Cia402State::OperationEnabled
            && self.mode == cia402::MODE_PROFILE_POSITION;
        if taken {
            let target = if value & cw::RELATIVE != 0 {
                let sum = i64::from(at) + i64::from(self.target_position);
                // Beyond the end of travel the target is the end of travel.
                sum.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
            } else {
                self.target_position
            };
            let speed = match self.profile_velocity {
                0 => DEFAULT_PROFILE_VELOCITY_UM_S,
                v => v,
            };
            axis.set_point = Some(SetPoint {
                target_um: target,
                speed_um_s: speed,
            });
            axis.in_progress = true;
            axis.acknowledged = true;
        }
        self.axis = Some(self.plan(axis, at, t_ms));
        taken
    }

    fn arm_tpdo(&mut self, k: usize, now: Instant) {
        let operational = self.nmt == NmtState::Operational && !self.silent;
        let period = self.tpdos[k].event_timer_ms;
        // A TPDO (re)armed while others of the same period run joins their cycle, so they
        // keep going out together, from one sample.
        let cycle = self
            .tpdos
            .iter()
            .enumerate()
            .filter(|&(j, t)| j != k && t.event_timer_ms == period)
            .find_map(|(_, t)| t.due);
        let t = &mut self.tpdos[k];
        t.syncs = 0;
        t.due = if operational && t.is_valid(k) && t.is_timer_driven() {
            cycle.or_else(|| after(now, period))
        } else {
            None
        };
    }

    fn disarm_tpdos(&mut self) {
        for t in &mut self.tpdos {
            t.due = None;
            t.syncs = 0;
        }
    }

    /// Sends the TPDOs marked due, in order TPDO1, TPDO2, ... back to back, all built
    /// from one model sample.
    fn send_tpdos(&mut self, due: [bool; TPDO_COUNT], t_ms: u32, out: &mut Vec<Frame>) {
        if !due.contains(&true) {
            return;
        }
        let values = self.process_values(t_ms);
        for (k, _) in due.iter().enumerate().filter(|(_, &d)| d) {
            let mut data = Vec::with_capacity(8);
            for &raw in od::TPDO_MAPPINGS[k] {
                // The fixed mappings name existing objects of whole bytes (a unit test
                // checks it); anything else would be skipped, not a panic.
                let Ok(entry) = od::lookup((raw >> 16) as u16, (raw >> 8) as u8) else {
                    continue;
                };
                let bytes = self.value(&entry, &values);
                let len = ((raw & 0xFF) as usize / 8).min(bytes.len());
                data.extend_from_slice(&bytes[..len]);
            }
            out.push(Frame::ours((self.tpdos[k].cob_id & 0x7FF) as u16, &data));
            self.tpdo_sent += 1;
        }
    }

    /// An EMCY (CiA 301 v4.2, 7.2.7): error code, error register, 5 zero bytes. Only in
    /// pre-operational and operational.
    fn emcy(&self, code: u16, out: &mut Vec<Frame>) {
        if self.silent || self.nmt == NmtState::Stopped {
            return;
        }
        let c = code.to_le_bytes();
        self.send(
            out,
            cob::EMCY,
            &[c[0], c[1], self.error_register(), 0, 0, 0, 0, 0],
        );
    }

    fn error_register(&self) -> u8 {
        if self.error_code != 0 {
            od::ERROR_REGISTER_GENERIC
        } else {
            0
        }
    }

    fn send(&self, out: &mut Vec<Frame>, function: u16, data: &[u8]) {
        if !self.silent {
            out.push(Frame::ours(function + u16::from(self.id), data));
        }
    }

    /// The value of a readable object, little-endian.
    fn value(&self, entry: &Entry, v: &ProcessValues) -> Vec<u8> {
        use Object::*;
        match entry.object {
            DeviceType => od::DEVICE_TYPE.to_le_bytes().to_vec(),
            ErrorRegister => vec![self.error_register()],
            DeviceName => od::DEVICE_NAME.as_bytes().to_vec(),
            HeartbeatTime => self.heartbeat_ms.to_le_bytes().to_vec(),
            IdentityCount => vec![4],
            VendorId => od::VENDOR_ID.to_le_bytes().to_vec(),
            ProductCode => od::PRODUCT_CODE.to_le_bytes().to_vec(),
            Revision => od::REVISION.to_le_bytes().to_vec(),
            SerialNumber => u32::from(self.id).to_le_bytes().to_vec(),
            TpdoCommCount(_) => vec![od::TPDO_COMM_SUBS],
            TpdoCobId(k) => self.tpdos[k].cob_id.to_le_bytes().to_vec(),
            TpdoTransmissionType(k) => vec![self.tpdos[k].transmission_type],
            TpdoEventTimer(k) => self.tpdos[k].event_timer_ms.to_le_bytes().to_vec(),
            TpdoMappingCount(k) => vec![od::TPDO_MAPPINGS[k].len() as u8],
            TpdoMappingEntry(k, n) => od::TPDO_MAPPINGS[k][n - 1].to_le_bytes().to_vec(),
            RpdoCommCount => vec![od::RPDO_COMM_SUBS],
            RpdoCobId => self.rpdo_cob_id.to_le_bytes().to_vec(),
            RpdoTransmissionType => vec![self.rpdo_transmission_type],
            RpdoMappingCount => vec![1],
            RpdoMappingEntry => od::RPDO_MAPPING.to_le_bytes().to_vec(),
            ModelTime => v.t_ms.to_le_bytes().to_vec(),
            Temperature => v.temperature.to_le_bytes().to_vec(),
            DcBusVoltage => v.dc_bus_mv.to_le_bytes().to_vec(),
            ErrorCode => self.error_code.to_le_bytes().to_vec(),
            Controlword => self.controlword.to_le_bytes().to_vec(),
            Statusword => self.statusword(v.t_ms).to_le_bytes().to_vec(),
            ModesOfOperation | ModeDisplay => self.mode.to_le_bytes().to_vec(),
            PositionActual => v.position.to_le_bytes().to_vec(),
            VelocityActual => v.velocity.to_le_bytes().to_vec(),
            TorqueActual => v.torque.to_le_bytes().to_vec(),
            CurrentActual => v.current.to_le_bytes().to_vec(),
            TargetPosition => self.target_position.to_le_bytes().to_vec(),
            ProfileVelocity => self.profile_velocity.to_le_bytes().to_vec(),
            TargetVelocity => self.target_velocity.to_le_bytes().to_vec(),
        }
    }
}

/// `now + ms`, or `None` for 0 ms (that schedule is off).
fn after(now: Instant, ms: u16) -> Option<Instant> {
    (ms > 0).then(|| now + Duration::from_millis(u64::from(ms)))
}

/// The next deadline of a periodic schedule that fired at `due`: one period on, or one
/// period from `now` when the loop fell behind by more than a period (no burst of
/// catch-up frames).
fn advance(due: Instant, period_ms: u16, now: Instant) -> Instant {
    let period = Duration::from_millis(u64::from(period_ms.max(1)));
    let next = due + period;
    if next <= now {
        now + period
    } else {
        next
    }
}

/// The node's object dictionary as the SDO server sees it, at one instant.
struct NodeDictionary<'a> {
    node: &'a mut Node,
    now: Instant,
    t_ms: u32,
    out: &'a mut Vec<Frame>,
}

impl Dictionary for NodeDictionary<'_> {
    fn entry(&self, index: u16, sub: u8) -> Result<Entry, AbortCode> {
        od::lookup(index, sub)
    }

    fn read(&mut self, entry: &Entry) -> Vec<u8> {
        let values = self.node.process_values(self.t_ms);
        self.node.value(entry, &values)
    }

    fn write(&mut self, entry: &Entry, data: &[u8]) -> Result<(), AbortCode> {
        use Object::*;
        let node = &mut *self.node;
        // The SDO server passes exactly the entry's size.
        let u16_le = || u16::from_le_bytes([data[0], data[1]]);
        let u32_le = || u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match entry.object {
            HeartbeatTime => {
                // The new producer time takes effect at once (CiA 301 v4.2, 7.2.8.3.2.1).
                node.heartbeat_ms = u16_le();
                node.next_heartbeat = after(self.now, node.heartbeat_ms);
            }
            TpdoCobId(k) => {
                let value = u32_le();
                let old = node.tpdos[k].cob_id;
                let both_valid = value & od::COB_ID_INVALID == 0 && old & od::COB_ID_INVALID == 0;
                // 29-bit ids are not supported; a valid PDO's id may not change without
                // invalidating it first (CiA 301 v4.2, 7.5.2.35).
                if value & od::COB_ID_EXTENDED != 0
                    || value & 0x1FFF_F800 != 0
                    || (both_valid && (value & 0x7FF) != (old & 0x7FF))
                {
                    return Err(AbortCode::INVALID_VALUE);
                }
                node.tpdos[k].cob_id = value;
                node.arm_tpdo(k, self.now);
            }
            TpdoTransmissionType(k) => {
                let value = data[0];
                // 241-251 are reserved.
                if (241..=251).contains(&value) {
                    return Err(AbortCode::INVALID_VALUE);
                }
                node.tpdos[k].transmission_type = value;
                node.arm_tpdo(k, self.now);
            }
            TpdoEventTimer(k) => {
                node.tpdos[k].event_timer_ms = u16_le();
                node.arm_tpdo(k, self.now);
            }
            Controlword => {
                node.write_controlword(u16_le(), self.t_ms, self.out);
            }
            RpdoCobId => {
                let value = u32_le();
                let old = node.rpdo_cob_id;
                let both_valid = value & od::COB_ID_INVALID == 0 && old & od::COB_ID_INVALID == 0;
                if value & od::COB_ID_EXTENDED != 0
                    || value & 0x1FFF_F800 != 0
                    || (both_valid && (value & 0x7FF) != (old & 0x7FF))
                {
                    return Err(AbortCode::INVALID_VALUE);
                }
                node.rpdo_cob_id = value;
            }
            RpdoTransmissionType => {
                let value = data[0];
                if (241..=253).contains(&value) {
                    return Err(AbortCode::INVALID_VALUE);
                }
                node.rpdo_transmission_type = value;
                node.rpdo_latched = None;
            }
            ModesOfOperation => {
                let mode = data[0] as i8;
                if !od::SUPPORTED_MODES.contains(&mode) {
                    return Err(AbortCode::INVALID_VALUE);
                }
                node.set_mode(mode, self.t_ms);
            }
            TargetPosition => node.target_position = u32_le() as i32,
            ProfileVelocity => node.profile_velocity = u32_le(),
            TargetVelocity => {
                node.target_velocity = u32_le() as i32;
                // Profile velocity follows a new target at once.
                node.replan(self.t_ms);
            }
            // Every other object is read-only; the server checked that already.
            _ => return Err(AbortCode::READ_ONLY),
        }
        node.applied += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn node(defaults: NodeDefaults) -> (Node, Instant, Vec<Frame>) {
        let t0 = Instant::now();
        let mut n = Node::new(2, defaults, None, false);
        let mut out = Vec::new();
        n.power_on(t0, &mut out);
        (n, t0, out)
    }

    fn sdo_write(
        n: &mut Node,
        index: u16,
        sub: u8,
        data: &[u8],
        t0: Instant,
        t_ms: u32,
    ) -> Vec<Frame> {
        let i = index.to_le_bytes();
        let cs = 0x23 | (((4 - data.len()) as u8) << 2);
        let mut req = [cs, i[0], i[1], sub, 0, 0, 0, 0];
        req[4..4 + data.len()].copy_from_slice(data);
        let mut out = Vec::new();
        n.handle_sdo(&req, t0, t_ms, &mut out);
        out
    }

    fn sdo_read(n: &mut Node, index: u16, sub: u8, t_ms: u32) -> [u8; 8] {
        let i = index.to_le_bytes();
        let mut out = Vec::new();
        n.handle_sdo(
            &[0x40, i[0], i[1], sub, 0, 0, 0, 0],
            Instant::now(),
            t_ms,
            &mut out,
        );
        out[0].data().try_into().unwrap()
    }

    fn controlword(n: &mut Node, value: u16, t_ms: u32) -> Vec<Frame> {
        sdo_write(n, 0x6040, 0, &value.to_le_bytes(), Instant::now(), t_ms)
    }

    fn statusword(n: &mut Node, t_ms: u32) -> u16 {
        u16::from_le_bytes(sdo_read(n, 0x6041, 0, t_ms)[4..6].try_into().unwrap())
    }

    fn position(n: &Node, t_ms: u32) -> i32 {
        n.process_values(t_ms).position
    }

    #[test]
    fn a_profile_position_move_acknowledges_runs_and_reaches_its_target() {
        // Given an enabled node handed to the commands at 1 s
        let (mut n, t0, _) = node(NodeDefaults::default());
        let at = position(&n, 1_000);
        sdo_write(&mut n, 0x6060, 0, &[1], t0, 1_000);
        assert!(n.is_commanded());
        assert_eq!(position(&n, 1_500), at, "the axis stands where it was");
        // When a target 10 mm on at 20 mm/s is latched by a rising bit 4
        let target = at + 10_000;
        sdo_write(&mut n, 0x607A, 0, &target.to_le_bytes(), t0, 2_000);
        sdo_write(&mut n, 0x6081, 0, &20_000u32.to_le_bytes(), t0, 2_000);
        controlword(&mut n, 0x0F, 2_000);
        controlword(&mut n, 0x1F, 2_000);
        // Then set-point acknowledge shows until bit 4 falls, and the axis runs there
        assert_eq!(statusword(&mut n, 2_000), 0x1237);
        controlword(&mut n, 0x0F, 2_001);
        assert_eq!(statusword(&mut n, 2_001), 0x0237);
        assert_eq!(position(&n, 2_250), at + 5_000);
        assert_eq!(n.process_values(2_250).velocity, 20_000);
        assert_eq!(position(&n, 2_500), target);
        assert_eq!(statusword(&mut n, 2_500), 0x0637);
        assert_eq!(n.truth(2_500).statusword, 0x0637);
        assert_eq!((n.downloads(), n.applied()), (6, 6));
    }

    /// An enabled, operational node in profile position with a target loaded.
    fn loaded(target_um: i32) -> (Node, Instant) {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(0x01, t0, 0, &mut Vec::new());
        sdo_write(&mut n, 0x6060, 0, &[1], t0, 1_000);
        sdo_write(&mut n, 0x607A, 0, &target_um.to_le_bytes(), t0, 1_000);
        controlword(&mut n, 0x0F, 1_000);
        (n, t0)
    }

    #[test]
    fn a_synchronous_rpdo_takes_its_set_point_at_the_next_sync_and_not_before() {
        let (mut n, _) = loaded(50_000);
        let mut out = Vec::new();
        n.handle_rpdo(&0x1Fu16.to_le_bytes(), 1_000, &mut out);
        assert_eq!(n.rpdos(), 1);
        assert_eq!(
            statusword(&mut n, 1_001) & 0x1000,
            0,
            "no acknowledge before SYNC"
        );
        n.handle_sync(7, 1_002, &mut out);
        assert_eq!(statusword(&mut n, 1_002) & 0x1000, 0x1000);
        assert_eq!(n.started_at_sync(), Some(7));
        // A second SYNC with nothing latched changes nothing.
        n.handle_sync(8, 1_003, &mut out);
        assert_eq!(n.started_at_sync(), Some(7));
    }

    #[test]
    fn an_rpdo_of_transmission_type_255_acts_at_once_and_a_short_one_is_ignored() {
        let (mut n, t0) = loaded(50_000);
        sdo_write(&mut n, 0x1400, 2, &[255], t0, 1_000);
        let mut out = Vec::new();
        n.handle_rpdo(&[0x1F], 1_000, &mut out);
        assert_eq!(n.rpdos(), 0, "one byte is shorter than the controlword");
        n.handle_rpdo(&0x1Fu16.to_le_bytes(), 1_000, &mut out);
        assert_eq!(statusword(&mut n, 1_000) & 0x1000, 0x1000);
        assert_eq!(n.started_at_sync(), None, "not started by a SYNC");
    }

    #[test]
    fn rpdos_count_only_in_operational_and_the_mapping_reads_as_the_controlword() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_rpdo(&0x1Fu16.to_le_bytes(), 0, &mut Vec::new());
        assert_eq!(n.rpdos(), 0, "pre-operational takes no PDO");
        assert_eq!(n.rpdo_cob(), Some(0x202));
        assert_eq!(sdo_read(&mut n, 0x1400, 2, 0)[4], 1);
        assert_eq!(sdo_read(&mut n, 0x1600, 0, 0)[4], 1);
        assert_eq!(
            sdo_read(&mut n, 0x1600, 1, 0)[4..8],
            0x6040_0010u32.to_le_bytes()
        );
        sdo_write(&mut n, 0x1400, 1, &0x8000_0202u32.to_le_bytes(), t0, 0);
        assert_eq!(n.rpdo_cob(), None, "bit 31 invalidates it");
    }

    #[test]
    fn a_relative_move_halt_and_quick_stop_act_on_the_commanded_axis() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        sdo_write(&mut n, 0x6060, 0, &[1], t0, 0);
        let at = position(&n, 0);
        sdo_write(&mut n, 0x607A, 0, &(-4_000i32).to_le_bytes(), t0, 0);
        controlword(&mut n, 0x0F | 0x40, 0);
        controlword(&mut n, 0x1F | 0x40, 0);
        // 50 mm/s by default: halfway after 40 ms; halt holds it there
        assert_eq!(position(&n, 40), at - 2_000);
        controlword(&mut n, 0x10F, 40);
        assert_eq!(position(&n, 100), at - 2_000);
        assert_eq!(statusword(&mut n, 100) & 0x0400, 0, "not at its target");
        // Halt cleared: the move goes on
        controlword(&mut n, 0x0F, 100);
        assert_eq!(position(&n, 140), at - 4_000);
        // Quick stop in profile velocity: the axis stands at once
        sdo_write(&mut n, 0x6060, 0, &[3], t0, 200);
        sdo_write(&mut n, 0x60FF, 0, &10_000i32.to_le_bytes(), t0, 200);
        assert_eq!(position(&n, 300), at - 3_000);
        controlword(&mut n, 0x02, 300);
        assert_eq!(n.state(), Cia402State::QuickStopActive);
        assert_eq!(position(&n, 900), at - 3_000);
    }

    #[test]
    fn a_fault_stops_a_commanded_axis_and_clear_leaves_it_disabled() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        sdo_write(&mut n, 0x6060, 0, &[3], t0, 0);
        sdo_write(&mut n, 0x60FF, 0, &1_000i32.to_le_bytes(), t0, 0);
        let at = position(&n, 0);
        let mut out = Vec::new();
        n.inject_fault(0x2310, 1_000, &mut out);
        assert_eq!(position(&n, 5_000), at + 1_000);
        n.clear_fault(5_000, &mut out);
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
        // A reset node gives the axis back to the repeating move
        n.reset_node(t0, 6_000, &mut out);
        assert!(!n.is_commanded());
    }

    #[test]
    fn an_injected_abort_answers_every_download_and_applies_nothing() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.set_abort(Some(0x0800_0022));
        let out = controlword(&mut n, 0x02, 10);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data(), [0x80, 0x40, 0x60, 0, 0x22, 0, 0, 0x08]);
        assert_eq!(n.state(), Cia402State::OperationEnabled);
        assert_eq!((n.downloads(), n.applied()), (1, 0));
        // Uploads still answer; noabort writes again
        assert_eq!(sdo_read(&mut n, 0x6041, 0, 10)[0], 0x4B);
        n.set_abort(None);
        sdo_write(&mut n, 0x6040, 0, &[0x02, 0], t0, 20);
        assert_eq!(n.state(), Cia402State::QuickStopActive);
        assert_eq!((n.downloads(), n.applied()), (2, 1));
    }

    #[test]
    fn a_disabled_drive_goes_through_shutdown_switch_on_and_enable_operation() {
        let (mut n, _, _) = node(NodeDefaults {
            start_enabled: false,
            ..NodeDefaults::default()
        });
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
        // Switch on and enable are refused from Switch on disabled
        controlword(&mut n, 0x0F, 10);
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
        for (cw, state) in [
            (0x06, Cia402State::ReadyToSwitchOn),
            (0x07, Cia402State::SwitchedOn),
            (0x0F, Cia402State::OperationEnabled),
            (0x07, Cia402State::SwitchedOn),
            (0x0F, Cia402State::OperationEnabled),
            (0x06, Cia402State::ReadyToSwitchOn),
            (0x0F, Cia402State::OperationEnabled),
            (0x02, Cia402State::QuickStopActive),
            (0x0F, Cia402State::OperationEnabled),
            (0x00, Cia402State::SwitchOnDisabled),
            (0x06, Cia402State::ReadyToSwitchOn),
            (0x0B, Cia402State::SwitchOnDisabled),
        ] {
            controlword(&mut n, cw, 20);
            assert_eq!(n.state(), state, "after controlword {cw:#06x}");
        }
        assert_eq!(sdo_read(&mut n, 0x6041, 0, 30)[4..6], [0x50, 0x02]);
        assert_eq!(sdo_read(&mut n, 0x6040, 0, 30)[4..6], [0x0B, 0x00]);
    }

    #[test]
    fn a_fault_sends_emcy_and_only_a_rising_fault_reset_leaves_it() {
        let (mut n, _, _) = node(NodeDefaults::default());
        let mut out = Vec::new();
        n.inject_fault(0x2310, 100, &mut out);
        assert_eq!(
            out,
            [Frame::ours(0x082, &[0x10, 0x23, 0x01, 0, 0, 0, 0, 0])]
        );
        assert_eq!(n.state(), Cia402State::Fault);
        assert_eq!(sdo_read(&mut n, 0x603F, 0, 110)[4..6], [0x10, 0x23]);
        assert_eq!(sdo_read(&mut n, 0x1001, 0, 110)[4], 0x01);
        // Commands do nothing in Fault
        assert_eq!(controlword(&mut n, 0x0F, 120).len(), 1);
        assert_eq!(n.state(), Cia402State::Fault);
        // The rising edge of bit 7 resets it: SDO answer, then the EMCY error reset
        let out = controlword(&mut n, 0x8F, 130);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].id(), 0x582);
        assert_eq!(out[1], Frame::ours(0x082, &[0; 8]));
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
        assert_eq!(sdo_read(&mut n, 0x603F, 0, 140)[4..6], [0, 0]);
        assert_eq!(sdo_read(&mut n, 0x1001, 0, 140)[4], 0);
        // Bit 7 still set: no command is carried out
        controlword(&mut n, 0x86, 150);
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
    }

    #[test]
    fn a_fault_reset_needs_a_rising_edge() {
        let (mut n, _, _) = node(NodeDefaults::default());
        controlword(&mut n, 0x80, 5);
        n.inject_fault(0x7500, 10, &mut Vec::new());
        // Bit 7 was already set: no edge
        controlword(&mut n, 0x80, 20);
        assert_eq!(n.state(), Cia402State::Fault);
        controlword(&mut n, 0x00, 30);
        controlword(&mut n, 0x80, 40);
        assert_eq!(n.state(), Cia402State::SwitchOnDisabled);
    }

    #[test]
    fn the_console_clear_returns_to_the_start_state() {
        let (mut n, _, _) = node(NodeDefaults::default());
        let mut out = Vec::new();
        n.inject_fault(0x2310, 100, &mut out);
        n.clear_fault(200, &mut out);
        assert_eq!(out[1], Frame::ours(0x082, &[0; 8]));
        assert_eq!(n.state(), Cia402State::OperationEnabled);
        // A second clear has nothing to clear
        n.clear_fault(300, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn the_axis_stands_still_outside_operation_enabled_and_resumes_where_it_stopped() {
        let (mut n, _, _) = node(NodeDefaults::default());
        let at_stop = n.process_values(1_000);
        n.inject_fault(0x2310, 1_000, &mut Vec::new());
        let stopped = n.process_values(1_700);
        assert_eq!(stopped.position, at_stop.position);
        assert_eq!(
            (stopped.velocity, stopped.torque, stopped.current),
            (0, 0, 0)
        );
        assert_eq!(n.motion_ms(1_700), 1_000);
        n.clear_fault(1_700, &mut Vec::new());
        assert_eq!(n.motion_ms(1_700), 1_000);
        assert_eq!(n.motion_ms(2_000), 1_300);
        assert_eq!(n.process_values(1_700).position, at_stop.position);
        // Quick stop freezes it too
        controlword(&mut n, 0x02, 2_000);
        assert_eq!(n.motion_ms(2_500), 1_300);
    }

    #[test]
    fn nmt_moves_between_states_and_the_heartbeat_shows_each() {
        let (mut n, t0, boot) = node(NodeDefaults::default());
        assert_eq!(boot, [Frame::ours(0x702, &[0x00])]);
        assert_eq!(n.nmt(), NmtState::PreOperational);
        let hb = |n: &mut Node, at: Instant| {
            let mut out = Vec::new();
            n.poll(at, 0, &mut out);
            out.into_iter()
                .find(|f| f.id() == 0x702)
                .map(|f| f.data()[0])
        };
        // The first heartbeat is one producer time after the boot-up
        assert_eq!(n.poll_timeout(), Some(t0 + 100 * MS));
        assert_eq!(hb(&mut n, t0 + 99 * MS), None);
        assert_eq!(hb(&mut n, t0 + 100 * MS), Some(0x7F));
        let mut t = t0 + 100 * MS;
        for (command, state) in [
            (nmt::START, 0x05),
            (nmt::STOP, 0x04),
            (nmt::START, 0x05),
            (nmt::ENTER_PRE_OPERATIONAL, 0x7F),
            (0x55, 0x7F),
        ] {
            n.handle_nmt(command, t, 0, &mut Vec::new());
            t += 100 * MS;
            assert_eq!(hb(&mut n, t), Some(state), "after NMT {command:#04x}");
        }
    }

    #[test]
    fn reset_node_sends_boot_up_and_restores_the_power_on_values() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(nmt::START, t0, 0, &mut Vec::new());
        sdo_write(&mut n, 0x1017, 0, &[0xF4, 0x01], t0, 0);
        n.inject_fault(0x2310, 10, &mut Vec::new());
        let mut out = Vec::new();
        n.handle_nmt(nmt::RESET_NODE, t0 + 20 * MS, 20, &mut out);
        assert_eq!(out, [Frame::ours(0x702, &[0x00])]);
        assert_eq!(n.nmt(), NmtState::PreOperational);
        assert_eq!(n.state(), Cia402State::OperationEnabled);
        assert_eq!(sdo_read(&mut n, 0x1017, 0, 30)[4..6], [100, 0]);
        assert_eq!(sdo_read(&mut n, 0x603F, 0, 30)[4..6], [0, 0]);
        // Reset communication restores 0x1017 but leaves the drive's state alone
        sdo_write(&mut n, 0x1017, 0, &[0xF4, 0x01], t0, 30);
        n.inject_fault(0x2310, 40, &mut Vec::new());
        let mut out = Vec::new();
        n.handle_nmt(nmt::RESET_COMMUNICATION, t0 + 50 * MS, 50, &mut out);
        assert_eq!(out, [Frame::ours(0x702, &[0x00])]);
        assert_eq!(sdo_read(&mut n, 0x1017, 0, 60)[4..6], [100, 0]);
        assert_eq!(n.state(), Cia402State::Fault);
    }

    #[test]
    fn a_heartbeat_time_written_over_sdo_takes_effect_at_once_and_zero_stops_it() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        let out = sdo_write(&mut n, 0x1017, 0, &[0xFA, 0x00], t0 + 10 * MS, 10);
        assert_eq!(out[0].data(), [0x60, 0x17, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(n.poll_timeout(), Some(t0 + 260 * MS));
        sdo_write(&mut n, 0x1017, 0, &[0, 0], t0 + 20 * MS, 20);
        assert_eq!(n.poll_timeout(), None);
    }

    #[test]
    fn sdo_is_not_answered_in_stopped() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(nmt::STOP, t0, 0, &mut Vec::new());
        let mut out = Vec::new();
        assert_eq!(
            n.handle_sdo(&[0x40, 0x41, 0x60, 0, 0, 0, 0, 0], t0, 0, &mut out),
            None
        );
        assert!(out.is_empty());
    }

    #[test]
    fn emcy_is_not_sent_in_stopped() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(nmt::STOP, t0, 0, &mut Vec::new());
        let mut out = Vec::new();
        n.inject_fault(0x2310, 10, &mut out);
        assert!(out.is_empty());
        assert_eq!(n.state(), Cia402State::Fault);
    }

    #[test]
    fn a_valid_tpdo_cob_id_cannot_change_without_being_invalidated_first() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        let abort = |out: &[Frame]| u32::from_le_bytes(out[0].data()[4..8].try_into().unwrap());
        let out = sdo_write(&mut n, 0x1800, 1, &0x190u32.to_le_bytes(), t0, 0);
        assert_eq!(abort(&out), 0x0609_0030);
        let out = sdo_write(&mut n, 0x1800, 1, &0x8000_0182u32.to_le_bytes(), t0, 0);
        assert_eq!(out[0].data()[0], 0x60);
        let out = sdo_write(&mut n, 0x1800, 1, &0x190u32.to_le_bytes(), t0, 0);
        assert_eq!(out[0].data()[0], 0x60);
        assert_eq!(sdo_read(&mut n, 0x1800, 1, 0)[4..8], 0x190u32.to_le_bytes());
        let out = sdo_write(&mut n, 0x1800, 1, &0xA000_0190u32.to_le_bytes(), t0, 0);
        assert_eq!(abort(&out), 0x0609_0030);
        let out = sdo_write(&mut n, 0x6060, 0, &[0x55], t0, 0);
        assert_eq!(abort(&out), 0x0609_0030);
        let out = sdo_write(&mut n, 0x6060, 0, &[0x03], t0, 0);
        assert_eq!(out[0].data()[0], 0x60);
        assert_eq!(sdo_read(&mut n, 0x6061, 0, 0)[4], 0x03);
    }

    #[test]
    fn silent_nodes_send_nothing_and_ignore_nmt_then_carry_on_without_boot_up() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(nmt::START, t0, 0, &mut Vec::new());
        n.set_silent(true, t0);
        assert_eq!(n.poll_timeout(), None);
        let mut out = Vec::new();
        n.handle_nmt(nmt::STOP, t0, 0, &mut out);
        n.inject_fault(0x2310, 0, &mut out);
        n.poll(t0 + 500 * MS, 500, &mut out);
        assert_eq!(
            n.handle_sdo(&[0x40, 0x41, 0x60, 0, 0, 0, 0, 0], t0, 0, &mut out),
            None
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(n.nmt(), NmtState::Operational, "NMT stop was ignored");
        // Back: no boot-up, heartbeat and TPDOs from now on
        let t1 = t0 + 600 * MS;
        n.set_silent(false, t1);
        assert_eq!(n.poll_timeout(), Some(t1 + 10 * MS));
        n.poll(t1 + 100 * MS, 700, &mut out);
        assert!(
            out.iter().all(|f| f.id() != 0x702 || f.data() == [0x05]),
            "{out:?}"
        );
        assert!(out.iter().any(|f| f.id() == 0x702));
    }

    #[test]
    fn sync_mode_sends_the_tpdos_on_each_sync_and_only_when_operational() {
        let (mut n, t0, _) = node(NodeDefaults {
            tpdo: TpdoMode::Sync,
            ..NodeDefaults::default()
        });
        let mut out = Vec::new();
        n.handle_sync(1, 5, &mut out);
        assert!(out.is_empty(), "pre-operational sends no TPDO");
        n.handle_nmt(nmt::START, t0, 0, &mut out);
        // No timer in sync mode: only the heartbeat is scheduled
        assert_eq!(n.poll_timeout(), Some(t0 + 100 * MS));
        n.handle_sync(1, 5, &mut out);
        assert_eq!(
            out.iter().map(Frame::id).collect::<Vec<_>>(),
            [0x182, 0x282, 0x382]
        );
        assert_eq!(sdo_read(&mut n, 0x1800, 2, 5)[4], 1);
        assert_eq!(sdo_read(&mut n, 0x1800, 5, 5)[4..6], [0, 0]);
    }

    #[test]
    fn timer_tpdos_come_every_period_in_order_from_one_sample() {
        let (mut n, t0, _) = node(NodeDefaults::default());
        n.handle_nmt(nmt::START, t0, 0, &mut Vec::new());
        let mut out = Vec::new();
        n.poll(t0 + 9 * MS, 9, &mut out);
        assert!(out.is_empty());
        n.poll(t0 + 10 * MS, 10, &mut out);
        assert_eq!(
            out.iter().map(Frame::id).collect::<Vec<_>>(),
            [0x182, 0x282, 0x382]
        );
        let v = n.process_values(10);
        let d: Vec<&[u8]> = out.iter().map(Frame::data).collect();
        assert_eq!(d[0][0..2], n.state().statusword().to_le_bytes());
        assert_eq!(d[0][2..6], v.position.to_le_bytes());
        assert_eq!(d[0][6..8], v.torque.to_le_bytes());
        assert_eq!(d[1][0..4], v.velocity.to_le_bytes());
        assert_eq!(d[1][4..6], v.current.to_le_bytes());
        assert_eq!(d[1][6..8], v.temperature.to_le_bytes());
        assert_eq!(d[2], [10, 0, 0, 0, 0, 0, 8]);
        assert_eq!(n.poll_timeout(), Some(t0 + 20 * MS));
        // An invalidated TPDO2 is no longer sent
        sdo_write(&mut n, 0x1801, 1, &0x8000_0282u32.to_le_bytes(), t0, 15);
        let mut out = Vec::new();
        n.poll(t0 + 20 * MS, 20, &mut out);
        assert_eq!(
            out.iter().map(Frame::id).collect::<Vec<_>>(),
            [0x182, 0x382]
        );
        assert_eq!(n.tpdo_sent(), 5);
    }
}
