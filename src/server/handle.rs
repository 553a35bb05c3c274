//! `ServerHandle`: stops a running server and asks it to send or drain, from another
//! thread, through the loop's waker.

use super::*;

pub use crate::control::admin::{Outgoing, Target};

/// Work handed to the loop from another thread or the admin API.
#[derive(Debug)]
pub(super) enum Command {
    Send(Target, Outgoing, mpsc::Sender<Result<usize, String>>),
    Drain(String, mpsc::Sender<Result<usize, String>>),
}

/// Controls a running [`Server`] from any thread: Broadcast, WriteData, Ping, close, drain.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    pub(super) waker: Arc<Waker>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) commands: mpsc::Sender<Command>,
}

impl ServerHandle {
    /// Same as SIGTERM: stop accepting, finish exchanges, close tunnels after the drain timeout.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }

    fn call(
        &self,
        cmd: impl FnOnce(mpsc::Sender<Result<usize, String>>) -> Command,
    ) -> Result<usize, String> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(cmd(tx))
            .map_err(|_| "server stopped".to_string())?;
        self.waker.wake().map_err(|e| e.to_string())?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "server did not answer".to_string())?
    }

    /// Sends `msg` to the WebSocket clients `to` selects; returns how many got it queued.
    /// Frames go out between the backend's messages, never inside one.
    pub fn send(&self, to: Target, msg: Outgoing) -> Result<usize, String> {
        self.call(|tx| Command::Send(to, msg, tx))
    }

    /// Broadcast: a text message to every WebSocket client.
    pub fn broadcast(&self, text: &str) -> Result<usize, String> {
        self.send(Target::All, Outgoing::Text(text.to_string()))
    }

    /// Puts a backend (guid or static URL) in draining state: no new clients, and its
    /// WebSocket clients get 1012 spread over `--backend-drain-window`.
    pub fn drain_backend(&self, name: &str) -> Result<usize, String> {
        self.call(|tx| Command::Drain(name.to_string(), tx))
    }
}
