//! Backend self-registration: the control protocol codec (pure) and the control connection.
pub mod protocol;
pub(crate) mod session;
