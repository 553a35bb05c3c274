//! Backend self-registration: the control protocol codec (pure) and the control connection.
pub mod auth;
pub mod protocol;
pub(crate) mod session;
