//! The control listener: backend self-registration (the protocol codec, pure, and the
//! session state machine), credentials, and the status page and JSON views of the admin API.
pub mod admin;
pub mod auth;
pub mod live;
pub mod messaging;
pub mod protocol;
pub(crate) mod session;
pub(crate) mod status;
