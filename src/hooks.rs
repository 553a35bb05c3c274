//! Library hooks mirroring the moments of the balancer (the seed component's events), for
//! programs that embed [`crate::Server`]. Every method has an empty default, and a server
//! without hooks never calls any: the hot path pays one branch.

use std::net::SocketAddr;

/// Callbacks from the event loop. They run on the loop thread: keep them short.
pub trait Hooks: Send {
    /// A client connected (OnClientConnect, before pairing).
    fn on_client_connect(&mut self, _client: u64, _peer: SocketAddr) {}
    /// A client was paired with a backend for a WebSocket or an HTTP request.
    fn on_client_paired(&mut self, _client: u64, _backend: &str) {}
    /// A client connection ended.
    fn on_client_disconnect(&mut self, _client: u64) {}
    /// A backend's control connection opened (OnServerConnect).
    fn on_server_connect(&mut self, _peer: SocketAddr) {}
    /// A backend registered and is eligible (OnServerReady).
    fn on_server_ready(&mut self, _guid: &str) {}
    /// A registered backend left (OnServerDisconnect).
    fn on_server_disconnect(&mut self, _guid: &str) {}
    /// Overrides selection (OnBeforeSendServerBinding): `candidates` are the eligible
    /// backends' names; return an index to choose one, `None` for the configured algorithm.
    fn select_backend(&mut self, _client: u64, _candidates: &[&str]) -> Option<usize> {
        None
    }
    /// Edits the request head forwarded to the backend (OnLoadBalancerHTTPRequest). The
    /// bytes must remain one valid HTTP/1.1 head ending in CRLF CRLF; framing fields must not
    /// change.
    fn on_request_head(&mut self, _head: &mut Vec<u8>) {}
    /// Sees each client message before it is forwarded (OnClientMessage), only with
    /// `--inspect`; messages over 1 MiB are shown cut to their first MiB.
    fn on_client_message(&mut self, _client: u64, _text: bool, _payload: &[u8]) {}
    /// Edits the response head relayed to the client (OnLoadBalancerHTTPResponse), same rules.
    fn on_response_head(&mut self, _head: &mut Vec<u8>) {}
}
