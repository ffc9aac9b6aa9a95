//! The control API transport: HTTP/1.1 + JSON on a root-only Unix socket for the CLI (and
//! `curl --unix-socket`), and the same server on TCP for Prometheus metrics. The routes are a
//! [`Handler`]; this module moves requests and replies.
//!
//! ```text
//! enforcer <cmd> --Client--> /run/enforcer/control.sock (0600, dir 0700)
//!                              serve_unix: peer uid 0? --no--> 403, logged
//!                                                     --yes-> Handler --> Reply (JSON, text, stream)
//! Prometheus -----TCP------> serve_tcp --> Handler (Peer::Tcp)
//! ```
//!
//! Both servers read the body whole (up to [`MAX_REQUEST_BODY`]), decode the query, run each
//! connection in a task of its own, and on shutdown stop accepting, end open streams and let
//! requests in flight finish.
#![forbid(unsafe_code)]

mod body;
mod client;
mod query;
mod server;
mod socket;
pub mod v1;

pub use client::{Client, ClientError, Lines, REQUEST_TIMEOUT, Response};
pub use server::{Handler, MAX_REQUEST_BODY, Peer, Reply, Request, serve_tcp, serve_unix};
pub use socket::{ControlError, bind_control_socket};
