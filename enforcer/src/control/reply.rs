//! What the control API's routes answer with: JSON documents (errors as [`v1::ErrorBody`]),
//! text and streams of lines, as axum responses.
#![forbid(unsafe_code)]

use std::fmt::Display;

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::error;

use super::{body::LineStream, v1};

/// What a route answers with.
#[derive(Debug)]
pub enum Reply {
    /// A JSON document, sent as `application/json` with a trailing newline.
    Json {
        /// The status code.
        status: StatusCode,
        /// The document.
        body: serde_json::Value,
    },
    /// A text document, e.g. Prometheus metrics.
    Text {
        /// The status code.
        status: StatusCode,
        /// The `Content-Type`; must be a valid header value.
        content_type: &'static str,
        /// The document.
        body: String,
    },
    /// A 200 with a chunked body of lines, each sent as it arrives (`\n` appended when
    /// missing); it ends when the sender is dropped, the client goes away or the server shuts
    /// down, and the handler learns the last two from a failing `send`.
    Stream {
        /// The `Content-Type`; must be a valid header value.
        content_type: &'static str,
        /// The lines to send.
        lines: mpsc::Receiver<Bytes>,
    },
}

/// Marks a response whose body is a stream, which the server ends at shutdown (a whole body
/// in flight is let finish instead).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Streamed;

impl Reply {
    /// A 200 with `value` as JSON (a 500 naming the error if it does not serialize).
    pub fn json(value: impl Serialize) -> Self {
        Self::json_with(StatusCode::OK, value)
    }

    /// `value` as JSON with `status` (a 500 naming the error if it does not serialize).
    pub fn json_with(status: StatusCode, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(body) => Self::Json { status, body },
            Err(error) => {
                error!(%error, "failed to serialize a control API reply");
                Self::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format_args!("failed to serialize the reply: {error}"),
                )
            }
        }
    }

    /// An error reply: `{"error": message}` with `status`.
    pub fn error(status: StatusCode, message: impl Display) -> Self {
        Self::json_with(
            status,
            v1::ErrorBody {
                error: message.to_string(),
            },
        )
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, content_type, body, streamed) = match self {
            Self::Json { status, body } => {
                let mut bytes = serde_json::to_vec(&body).expect("a JSON value always serializes");
                bytes.push(b'\n');
                (status, "application/json", Body::from(bytes), false)
            }
            Self::Text {
                status,
                content_type,
                body,
            } => (status, content_type, Body::from(body), false),
            Self::Stream {
                content_type,
                lines,
            } => (
                StatusCode::OK,
                content_type,
                Body::new(LineStream::new(lines)),
                true,
            ),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if streamed {
            response.extensions_mut().insert(Streamed);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;

    use super::*;

    async fn render(reply: Reply) -> (StatusCode, String, String) {
        let response = reply.into_response();
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn json_reply_is_a_200_json_document_with_a_newline() {
        let reply = Reply::json(serde_json::json!({ "workloads": 3 }));
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "application/json".to_owned(),
                "{\"workloads\":3}\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn json_reply_serializes_any_serialize() {
        #[derive(Serialize)]
        struct Status {
            ready: bool,
        }
        let (_, _, body) = render(Reply::json(Status { ready: true })).await;
        assert_eq!(body, "{\"ready\":true}\n");
    }

    #[tokio::test]
    async fn unserializable_json_is_a_500_saying_why() {
        let map = std::collections::BTreeMap::from([((1, 2), "tuple keys")]);
        let (status, _, body) = render(Reply::json(map)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            body.starts_with("{\"error\":\"failed to serialize the reply: "),
            "{body}"
        );
    }

    #[tokio::test]
    async fn error_reply_carries_the_message() {
        let reply = Reply::error(StatusCode::NOT_FOUND, "no workload \"web\"");
        assert_eq!(
            render(reply).await,
            (
                StatusCode::NOT_FOUND,
                "application/json".to_owned(),
                "{\"error\":\"no workload \\\"web\\\"\"}\n".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn text_reply_keeps_its_content_type() {
        let reply = Reply::Text {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4",
            body: "enforcer_up 1\n".to_owned(),
        };
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "text/plain; version=0.0.4".to_owned(),
                "enforcer_up 1\n".to_owned()
            )
        );
    }

    #[test]
    fn whole_bodies_have_a_length_and_streams_are_marked() {
        let whole = Reply::error(StatusCode::BAD_REQUEST, "x").into_response();
        assert_eq!(whole.body().size_hint().exact(), Some(14));
        assert!(whole.extensions().get::<Streamed>().is_none());
        let (_sender, lines) = mpsc::channel(1);
        let stream = Reply::Stream {
            content_type: "application/x-ndjson",
            lines,
        }
        .into_response();
        assert_eq!(stream.status(), StatusCode::OK);
        assert_eq!(stream.body().size_hint().exact(), None);
        assert!(stream.extensions().get::<Streamed>().is_some());
    }

    #[tokio::test]
    async fn stream_reply_sends_the_lines_until_the_sender_is_dropped() {
        let (sender, lines) = mpsc::channel(4);
        for line in ["{\"n\":1}", "{\"n\":2}\n"] {
            sender
                .send(Bytes::from_static(line.as_bytes()))
                .await
                .unwrap();
        }
        drop(sender);
        let reply = Reply::Stream {
            content_type: "application/x-ndjson",
            lines,
        };
        assert_eq!(
            render(reply).await,
            (
                StatusCode::OK,
                "application/x-ndjson".to_owned(),
                "{\"n\":1}\n{\"n\":2}\n".to_owned()
            )
        );
    }
}
