//! A TCP proxy on `127.0.0.1:0` in front of a server, to make the server go away and come back:
//! [`Proxy::pause`] drops every open connection and refuses new ones (accepted and closed at
//! once, as a server that is down would), [`Proxy::blackhole`] drops open connections and
//! holds new ones unanswered (a partition: clients time out), [`Proxy::resume`] forwards again.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Refuse,
    Blackhole,
}

#[derive(Debug)]
struct State {
    target: SocketAddr,
    /// One lock for the mode and the connections, so none slips through a mode change.
    inner: Mutex<Inner>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    /// The forwarding tasks of open connections.
    connections: Vec<AbortHandle>,
    /// Connections held unanswered while blackholed.
    held: Vec<TcpStream>,
}

/// The proxy; dropping it stops it and closes its connections.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: AbortHandle,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            target,
            inner: Mutex::new(Inner {
                mode: Mode::Forward,
                connections: Vec::new(),
                held: Vec::new(),
            }),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone())).abort_handle();
        Ok(Proxy { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server goes away: open connections are dropped, new ones closed at once.
    pub fn pause(&self) {
        self.set(Mode::Refuse);
    }

    /// The network swallows everything: open connections are dropped, new ones are accepted
    /// and never answered (until [`resume`](Self::resume), which closes them).
    pub fn blackhole(&self) {
        self.set(Mode::Blackhole);
    }

    /// The server is back.
    pub fn resume(&self) {
        self.set(Mode::Forward);
    }

    /// Connections accepted and forwarded, and connections refused or held, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.accepted.load(Ordering::SeqCst),
            self.state.refused.load(Ordering::SeqCst),
        )
    }

    fn set(&self, mode: Mode) {
        let mut inner = lock(&self.state.inner);
        inner.mode = mode;
        if mode != Mode::Forward {
            for c in inner.connections.drain(..) {
                c.abort();
            }
        }
        if mode != Mode::Blackhole {
            inner.held.clear();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let mut inner = lock(&self.state.inner);
        for c in inner.connections.drain(..) {
            c.abort();
        }
        inner.held.clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let mut inner = lock(&state.inner);
        match inner.mode {
            Mode::Refuse => {
                state.refused.fetch_add(1, Ordering::SeqCst);
                drop(inbound);
            }
            Mode::Blackhole => {
                state.refused.fetch_add(1, Ordering::SeqCst);
                inner.held.push(inbound);
            }
            Mode::Forward => {
                state.accepted.fetch_add(1, Ordering::SeqCst);
                let target = state.target;
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                inner.connections.retain(|c| !c.is_finished());
                inner.connections.push(task.abort_handle());
            }
        }
    }
}
