//! The control API transport: HTTP/1.1 + JSON on a root-only Unix socket for the CLI (and
//! `curl --unix-socket`), and the same server on TCP for Prometheus metrics. An API names its
//! routes as an axum `Router` ([`Routes`]); this module accepts connections, gates and limits
//! requests, and moves replies.
//!
//! ```text
//! enforcer <cmd> --ControlClient--> /run/enforcer/control.sock (0600, dir 0711)
//!                                   serve_unix: peer uid 0? --no--> 403, logged
//!                                                          --yes-> Router --> Reply (JSON, text, stream)
//! Prometheus -------TCP-----------> serve_tcp --> Router (Caller::Tcp)
//! ```
//!
//! Both servers refuse a query that does not decode strictly, on every route ([`Query`] decodes
//! it for the routes that read one), read the body whole (up to [`MAX_REQUEST_BODY`]) before a
//! route sees it, run each connection in a task of its own, and on shutdown stop accepting, end
//! open streams and let requests in flight finish.
#![forbid(unsafe_code)]

mod body;
mod client;
mod middleware;
mod query;
mod reply;
mod server;
mod socket;
pub(crate) mod v1;

pub use client::{ClientError, ControlClient, Lines, REQUEST_TIMEOUT, Response};
pub use query::Query;
pub use reply::Reply;
pub use server::{Caller, MAX_REQUEST_BODY, Routes, serve_tcp, serve_unix};
pub(crate) use socket::bind_socket;
pub use socket::{ControlError, bind_control_socket};
