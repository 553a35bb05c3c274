//! A client as backends see it (issue 17): its id in the forwarded request head, and the
//! frames backends ask the balancer to deliver, queued under `--client-queue-max`.
//! Kept out of `mod.rs` so the state machine stays about moving bytes.

use super::*;
use crate::http::rewrite::ClientId;

/// Close code for a client whose queue of balancer frames overflowed: 1013 "try again
/// later" (RFC 6455 registry) says the server is shedding this client, not that it broke a
/// rule (1008) or that the message was too big (1009).
const CLOSE_SLOW_CLIENT: u16 = 1013;
/// Reason sent with [`CLOSE_SLOW_CLIENT`].
const REASON_SLOW_CLIENT: &str = "client too slow for broadcasts";
/// Told to the backend leg of a client closed for being slow: it is going away.
const BACKEND_SLOW_CLIENT: u16 = 1001;

// `inject` relies on `--client-queue-max` never being above the tunnel's own cap.
const _: () = assert!(crate::config::MESSAGE_MAX_CEILING <= MAX_INJECT_BYTES);

/// What became of one backend message for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Queued; it goes out at the next message boundary, after earlier ones.
    Queued,
    /// The client's queue was over `--client-queue-max`: it is being closed with 1013.
    Overflow,
    /// Not an open WebSocket (HTTP exchange, or already closing).
    Refused,
}

impl Conn {
    /// The `--client-id-header` field for this client, `None` when the flag is off.
    pub(super) fn client_id_field<'a>(&self, cfg: &'a Config) -> Option<ClientId<'a>> {
        let m = &cfg.messaging;
        m.client_id_header.as_deref().map(|header| ClientId {
            header,
            instance: &m.instance_id,
            id: self.id,
        })
    }

    /// Queues a frame from a backend (or a ping when `opcode` is ping) and drives the
    /// connection. A client whose queue (frames not yet moved to the socket plus those
    /// moved but unwritten) would go over `--client-queue-max` is closed with 1013 instead:
    /// one slow reader must not hold memory for, or slow down, everyone else's broadcast.
    pub fn inject(&mut self, ctx: &mut Ctx<'_>, opcode: u8, payload: &[u8]) -> (Injected, Drive) {
        let Phase::Tunnel(t) = &mut self.phase else {
            return (Injected::Refused, Drive::Continue);
        };
        if t.pending_close.is_some() || t.down.close_seen() {
            return (Injected::Refused, Drive::Continue);
        }
        // Header bytes of a frame are at most 14.
        let queued = t.inject_bytes + self.to_client.head_pending() + payload.len() + 14;
        let outcome = if queued > ctx.cfg.messaging.client_queue_max {
            ctx.stats.ws_slow_clients_closed += 1;
            log::info(
                "slow websocket client closed",
                &[("client", &self.id), ("code", &CLOSE_SLOW_CLIENT)],
            );
            if let Phase::Tunnel(t) = &mut self.phase {
                // What it has not been sent yet is dropped with it, counted above.
                t.inject.clear();
                t.inject_bytes = 0;
                t.fail(
                    ctx.now,
                    CLOSE_SLOW_CLIENT,
                    Some(BACKEND_SLOW_CLIENT),
                    REASON_SLOW_CLIENT,
                );
            }
            self.last_activity = ctx.now;
            Injected::Overflow
        } else {
            // `--client-queue-max` is at most `MAX_INJECT_BYTES`, so the check above is the
            // stricter one: an error here means the tunnel is not open for injection.
            let sent = if opcode == crate::ws::frames::OPCODE_PING {
                self.ping()
            } else {
                self.send_frame(opcode, payload)
            };
            match sent {
                Ok(()) => Injected::Queued,
                Err(_) => return (Injected::Refused, Drive::Continue),
            }
        };
        (outcome, self.drive(ctx))
    }

    /// A close frame with `code` and `reason` for this WebSocket client, asked for by a
    /// backend. `false` if it is not an open WebSocket.
    pub fn close_websocket(
        &mut self,
        ctx: &mut Ctx<'_>,
        code: u16,
        reason: String,
    ) -> (bool, Drive) {
        let Phase::Tunnel(t) = &mut self.phase else {
            return (false, Drive::Continue);
        };
        if t.pending_close.is_some() || t.down.close_seen() {
            return (false, Drive::Continue);
        }
        // The first cause wins, so `going_away` keeps this reason.
        t.fail(ctx.now, code, Some(code), reason);
        (true, self.going_away(ctx, code))
    }
}
