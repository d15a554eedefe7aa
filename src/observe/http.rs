//! A minimal HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`: enough for Prometheus
//! and an orchestrator's probes, without a web framework in the worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::Metrics;

/// Serves until `stop` fires. `/readyz` answers 200 only while the broker connection is up.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics and health endpoints listening");
    loop {
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = stop.cancelled() => return Ok(()),
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let request = match read_head(&mut stream).await {
                Ok(head) => head,
                Err(e) => return debug!(%peer, error = %e, "metrics request unreadable"),
            };
            let request = String::from_utf8_lossy(&request);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" if metrics.broker_connected() => {
                    ("200 OK", "text/plain", "ready\n".into())
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "broker down\n".into(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// A request line and headers fit in 4 KiB; anything longer is not a probe.
const HEAD_LIMIT: usize = 4096;
/// A client gets this long to send its request, so slow ones cannot pile up tasks.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the request's head, which may come in several segments, up to the blank line that
/// ends it. Everything the client sent is read before the answer: closing a socket with unread
/// data resets the connection, and the client may lose the answer with it.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_LIMIT {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(result) => result.map(|()| head),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}
