//! What can go wrong between a worker and the broker.

/// A failed conversation with the broker. Each variant names the operation that failed; the
/// broker's own error is the source.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {url}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "the TLS certificate of the broker at {url} did not verify: no trusted CA signed it \
         (give its CA with --tls-ca or broker.tls_ca), or it expired or names another host"
    )]
    UntrustedCertificate {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot read the broker's CA certificates from {path}")]
    ReadTlsCa {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    TlsCaNotPem { path: std::path::PathBuf },
    #[error("cannot open a channel")]
    OpenChannel(#[source] lapin::Error),
    #[error("cannot enable publisher confirms")]
    ConfirmSelect(#[source] lapin::Error),
    #[error("cannot set the prefetch count to {count}")]
    Qos {
        count: u16,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot declare exchange `{name}`")]
    DeclareExchange {
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot declare queue `{name}`")]
    DeclareQueue {
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot bind queue `{queue}` to exchange `{exchange}` with key `{key}`")]
    Bind {
        queue: String,
        exchange: String,
        key: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot delete queue `{name}`")]
    DeleteQueue {
        name: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot consume queue `{queue}`")]
    Consume {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot read from queue `{queue}`")]
    Get {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot publish to exchange `{exchange}` with key `{routing_key}`")]
    Publish {
        exchange: String,
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker refused the message for exchange `{exchange}` with key `{routing_key}`")]
    PublishRefused {
        exchange: String,
        routing_key: String,
    },
    #[error("no queue took the message for exchange `{exchange}` with key `{routing_key}`")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("cannot acknowledge a delivery")]
    Ack(#[source] lapin::Error),
    #[error("the connection to the broker was lost")]
    ConnectionLost,
}

impl BrokerError {
    /// Whether trying again (usually on a new connection) may succeed. Refusals that follow
    /// from how the broker is set up, such as a queue declared with other arguments, do not
    /// go away by themselves.
    pub fn is_retryable(&self) -> bool {
        match self {
            BrokerError::DeclareExchange { source, .. }
            | BrokerError::DeclareQueue { source, .. }
            | BrokerError::Bind { source, .. } => !is_precondition_failed(source),
            BrokerError::Unroutable { .. } => false,
            _ => true,
        }
    }
}

/// The AMQP reply code of a channel or connection error, when the broker sent one.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// 406: the queue or exchange exists with other arguments than asked for.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    reply_code(error) == Some(406)
}
