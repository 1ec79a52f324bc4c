//! The control socket: newline-delimited JSON requests on a Unix socket, one reply line each.
//!
//! - [`protocol`]: every request and reply, and how a request line is parsed;
//! - [`server`]: the socket file and the event-loop server that reads requests and writes
//!   replies;
//! - [`dispatch`]: what a VM, or a `receive` that has no guest yet, answers;
//! - [`events`]: the event bus that feeds `events` subscribers without waiting for them;
//! - [`client`]: one request and its reply, and the `minivmm migrate` client.

pub mod client;
pub mod dispatch;
pub mod events;
pub mod protocol;
pub mod server;

pub use client::{request, ClientError};
pub use protocol::{MigrateRequest, Reply, Request, MAX_REQUEST_LEN};
pub use server::{bind, ControlError, ControlServer, ControlSocket, RequestHandler};
