//! The connection layer: accepting, limits and shutdown, under axum's router.
//!
//! - **Header timeout**: a client gets `header_timeout` to send a request's headers (hyper's
//!   own timer); one that sends a line and stops, or trickles a line a second, is closed.
//! - **Connection limit**: at most `max_connections` open at once; one more is answered
//!   `503` with an OpenAI-style error and closed, so idle sockets cannot starve the rest.
//! - **Graceful shutdown** on SIGTERM (what systemd, Docker and Kubernetes send) and SIGINT:
//!   stop accepting, let requests in flight finish — streams included — for up to
//!   `drain_timeout`, close idle connections at once, then exit. A second signal exits now.

use crate::ServeConfig;
use anyhow::Result;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// What a connection over the limit is told before it is closed.
fn overloaded() -> Vec<u8> {
    let body = r#"{"error":{"message":"too many open connections; retry later","type":"server_error","param":null,"code":"overloaded"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Answers an over-limit connection and closes it (without waiting on the client).
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&overloaded()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves `app` on `listener` until a shutdown signal, then drains.
pub async fn serve(listener: TcpListener, app: Router, cfg: &ServeConfig) -> Result<()> {
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset before it was
                        // accepted: keep serving the connections already open.
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream));
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(slot);
                });
            }
            _ = &mut signal => break,
        }
    }
    drop(listener);
    let deadline = cfg.drain_timeout;
    eprintln!(
        "shutting down: no new connections; requests in flight get up to {} s to finish \
         (signal again to stop now)",
        deadline.as_secs_f64()
    );
    tokio::select! {
        _ = graceful.shutdown() => eprintln!("all requests finished; bye"),
        _ = tokio::time::sleep(deadline) => {
            eprintln!("drain deadline reached; closing the remaining connections");
        }
        _ = shutdown_signal() => eprintln!("second signal; closing now"),
    }
    Ok(())
}
