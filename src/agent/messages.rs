//! Backend → client messages through every balancer (issue 17): [`Agent::messenger`] gives
//! a [`Messenger`] with `broadcast`, `send`, `close` and `ping`. A call queues one request per
//! registered link; each link thread writes it on its control WebSocket and posts the
//! balancer's `sent`/`failed` answer back; the call returns the sum.
//!
//! Client ids are `INSTANCE.N` (the `X-Wslb-Client` header): only the balancer whose
//! instance id matches acts on a `send`/`close`/`ping`, the others answer
//! `unknown_client`, so fanning every request out to all balancers needs no routing table
//! and survives a client's balancer being re-registered.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tungstenite::Message;

use super::{sent, Agent, Link, LinkState, Lost, Shared, Ws};
use crate::control::messaging::{self, Answer, ClientRef, Filter, Op, Payload, Request};

/// How long a call waits for every balancer's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests queued per link: a caller faster than the link gets `Busy`, not memory growth.
const MAX_QUEUED: usize = 1024;

/// Why a message call did not reach any client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// No link is registered right now.
    NotConnected,
    /// Too many requests queued on a link.
    Busy,
    /// Not every balancer answered within [`ANSWER_TIMEOUT`].
    Timeout,
    /// Refused by the balancers: the `failed` answer's code and message (`unknown_client`
    /// only when every balancer said so).
    Refused {
        /// e.g. `unknown_client`, `too_large`, `rate_limited`, `not_allowed`, `bad_field`.
        code: String,
        /// Human-readable text.
        message: String,
    },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::NotConnected => f.write_str("not registered with any balancer"),
            MessageError::Busy => f.write_str("too many messages queued; retry"),
            MessageError::Timeout => f.write_str("a balancer did not answer in time"),
            MessageError::Refused { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

impl std::error::Error for MessageError {}

impl MessageError {
    /// Short machine-readable code (the `failed` code, or one of the agent's own).
    pub fn code(&self) -> &str {
        match self {
            MessageError::NotConnected => "not_connected",
            MessageError::Busy => "busy",
            MessageError::Timeout => "timeout",
            MessageError::Refused { code, .. } => code,
        }
    }
}

/// Messaging state shared by the [`Agent`] handle and its link threads (inside `Board`).
#[derive(Debug, Default)]
pub(super) struct Mailboxes {
    /// Per link: requests (id, frame) waiting for its thread to write them.
    outbox: Vec<VecDeque<(u64, Message)>>,
    /// Per pending request id: the answers so far. Only ids a caller still waits for are
    /// here, so a late answer after a timeout is dropped, not kept forever.
    answers: HashMap<u64, Vec<Answer>>,
    next_id: u64,
}

impl Mailboxes {
    pub(super) fn new(links: usize) -> Mailboxes {
        Mailboxes {
            outbox: vec![VecDeque::new(); links],
            ..Mailboxes::default()
        }
    }

    /// Requests for link `index` to write now.
    pub(super) fn take_outbox(&mut self, index: usize) -> VecDeque<(u64, Message)> {
        self.outbox
            .get_mut(index)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Records a link's answer to request `id` if someone still waits for it.
    pub(super) fn answer(&mut self, id: u64, a: Answer) {
        if let Some(list) = self.answers.get_mut(&id) {
            list.push(a);
        }
    }
}

/// The answer a link gives for requests it could not carry (link lost before the answer).
pub(super) fn link_lost(id: u64) -> Answer {
    Answer::Failed {
        id: Some(id),
        code: "link_lost".into(),
        message: "the balancer link was lost before it answered".into(),
    }
}

/// One call's answers → its result. Any balancer that reached clients makes a success (the
/// count is the sum); otherwise the first refusal other than `unknown_client` (which the
/// balancers a client is not on always give), else `unknown_client`.
fn merge(answers: &[Answer]) -> Result<usize, MessageError> {
    let mut count = 0;
    let mut any_sent = false;
    let mut refusal: Option<(&str, &str)> = None;
    for a in answers {
        match a {
            Answer::Sent { count: n, .. } => {
                any_sent = true;
                count += n;
            }
            Answer::Failed { code, message, .. } => {
                let weaker = refusal.is_none_or(|(c, _)| c == "unknown_client");
                if weaker && (refusal.is_none() || code != "unknown_client") {
                    refusal = Some((code, message));
                }
            }
        }
    }
    match refusal {
        _ if any_sent && (count > 0 || refusal.is_none_or(|(c, _)| c == "unknown_client")) => {
            Ok(count)
        }
        Some((code, message)) => Err(MessageError::Refused {
            code: code.to_string(),
            message: message.to_string(),
        }),
        None => Ok(count),
    }
}

/// Sends messages to clients through every balancer the [`Agent`] is registered with.
/// Cheap to clone and `Send`: hand one to each thread or request handler of the backend.
#[derive(Debug, Clone)]
pub struct Messenger {
    shared: Arc<Shared>,
}

impl Agent {
    /// A handle for [`Messenger::broadcast`], [`Messenger::send`], [`Messenger::close`] and
    /// [`Messenger::ping`] to keep or hand to other threads; it works while the agent runs.
    pub fn messenger(&self) -> Messenger {
        Messenger {
            shared: Arc::clone(&self.shared),
        }
    }

    /// [`Messenger::broadcast`] through this agent's links.
    pub fn broadcast(
        &self,
        payload: Payload,
        filter: Filter,
        except: Option<ClientRef>,
    ) -> Result<usize, MessageError> {
        self.messenger().broadcast(payload, filter, except)
    }

    /// [`Messenger::send`] through this agent's links.
    pub fn send(&self, to: Vec<ClientRef>, payload: Payload) -> Result<usize, MessageError> {
        self.messenger().send(to, payload)
    }

    /// [`Messenger::close`] through this agent's links.
    pub fn close(&self, client: ClientRef, code: u16, reason: &str) -> Result<usize, MessageError> {
        self.messenger().close(client, code, reason)
    }
}

impl Messenger {
    /// Broadcasts `payload` to the WebSocket clients of every balancer (all of them, or
    /// those `filter` selects), except `except`. Returns how many clients it reached.
    pub fn broadcast(
        &self,
        payload: Payload,
        filter: Filter,
        except: Option<ClientRef>,
    ) -> Result<usize, MessageError> {
        self.request(Op::Broadcast {
            payload,
            filter,
            except,
        })
    }

    /// Sends `payload` to these clients, wherever they are connected.
    pub fn send(&self, to: Vec<ClientRef>, payload: Payload) -> Result<usize, MessageError> {
        self.request(Op::Send { to, payload })
    }

    /// Closes one client with `code` and `reason`.
    pub fn close(&self, client: ClientRef, code: u16, reason: &str) -> Result<usize, MessageError> {
        self.request(Op::Close {
            client,
            code,
            reason: reason.to_string(),
        })
    }

    /// Pings one client (the balancer consumes its pong).
    pub fn ping(&self, client: ClientRef) -> Result<usize, MessageError> {
        self.request(Op::Ping { client })
    }

    /// Any messaging request, to every registered balancer; waits for all the answers.
    pub fn request(&self, op: Op) -> Result<usize, MessageError> {
        let shared: &Shared = &self.shared;
        let mut board = shared.lock();
        let links: Vec<usize> = (board.links.iter().enumerate())
            .filter(|(_, s)| **s == LinkState::Registered)
            .map(|(i, _)| i)
            .collect();
        if links.is_empty() {
            return Err(MessageError::NotConnected);
        }
        let mail = &mut board.mail;
        if links
            .iter()
            .any(|&i| mail.outbox.get(i).is_some_and(|q| q.len() >= MAX_QUEUED))
        {
            return Err(MessageError::Busy);
        }
        mail.next_id += 1;
        let id = mail.next_id;
        let req = Request { id: Some(id), op };
        let frame = match &req.op {
            Op::Broadcast {
                payload: Payload::Binary(_),
                ..
            }
            | Op::Send {
                payload: Payload::Binary(_),
                ..
            } => Message::binary(messaging::encode_binary(&req).ok_or_else(|| {
                MessageError::Refused {
                    code: "bad_field".into(),
                    message: "request header over 64 KiB".into(),
                }
            })?),
            _ => Message::text(messaging::encode_text(&req)),
        };
        for &i in &links {
            if let Some(q) = mail.outbox.get_mut(i) {
                q.push_back((id, frame.clone()));
            }
        }
        mail.answers.insert(id, Vec::new());
        shared.changed.notify_all();
        let want = links.len();
        let (mut board, _) = shared
            .changed
            .wait_timeout_while(board, ANSWER_TIMEOUT, |b| {
                b.mail.answers.get(&id).is_some_and(|a| a.len() < want)
            })
            .unwrap_or_else(PoisonError::into_inner);
        let answers = board.mail.answers.remove(&id).unwrap_or_default();
        if answers.len() < want {
            return Err(MessageError::Timeout);
        }
        merge(&answers)
    }
}

impl Link {
    /// Writes the requests queued for this link; their ids join `inflight` until answered.
    pub(super) fn write_outbox(&self, ws: &mut Ws, inflight: &mut Vec<u64>) -> Result<(), Lost> {
        let queued = self.shared.lock().mail.take_outbox(self.index);
        for (id, frame) in queued {
            inflight.push(id);
            sent(ws.send(frame))?;
        }
        Ok(())
    }

    /// A `sent`/`failed` answer from the balancer: hands it to the waiting caller.
    pub(super) fn on_answer(&self, a: Answer, inflight: &mut Vec<u64>) {
        let id = match &a {
            Answer::Sent { id, .. } | Answer::Failed { id, .. } => *id,
        };
        let Some(id) = id else {
            return;
        };
        inflight.retain(|&i| i != id);
        self.shared.update(|b| b.mail.answer(id, a));
    }

    /// The link is gone: what it wrote or still had queued will get no answer from it.
    pub(super) fn fail_pending(&self, inflight: &mut Vec<u64>) {
        self.shared.update(|b| {
            let queued = b.mail.take_outbox(self.index);
            for id in inflight
                .drain(..)
                .chain(queued.into_iter().map(|(id, _)| id))
            {
                b.mail.answer(id, link_lost(id));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: usize) -> Answer {
        Answer::Sent { id: None, count: n }
    }

    fn failed(code: &str) -> Answer {
        Answer::Failed {
            id: None,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn answers_merge_across_balancers() {
        assert_eq!(merge(&[sent(3), sent(4)]), Ok(7));
        assert_eq!(merge(&[sent(0), sent(0)]), Ok(0));
        // The client is on one balancer: the others do not know it.
        assert_eq!(merge(&[failed("unknown_client"), sent(1)]), Ok(1));
        assert_eq!(
            merge(&[failed("unknown_client"), failed("unknown_client")])
                .map_err(|e| e.code().to_string()),
            Err("unknown_client".into())
        );
        // A real refusal wins over "not here".
        assert_eq!(
            merge(&[failed("unknown_client"), failed("too_large")])
                .map_err(|e| e.code().to_string()),
            Err("too_large".into())
        );
        assert_eq!(
            merge(&[failed("rate_limited"), failed("unknown_client")])
                .map_err(|e| e.code().to_string()),
            Err("rate_limited".into())
        );
        // Partly delivered is delivered.
        assert_eq!(merge(&[failed("rate_limited"), sent(5)]), Ok(5));
    }
}
