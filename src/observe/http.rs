//! A minimal HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`: enough for Prometheus
//! and an orchestrator's probes, without a web framework in the worker.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
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
            // A request line and headers fit in 4 KiB; anything longer is not a probe.
            let mut buf = vec![0u8; 4096];
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => return debug!(%peer, error = %e, "metrics request unreadable"),
            };
            let request = String::from_utf8_lossy(&buf[..n]);
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
        });
    }
}
