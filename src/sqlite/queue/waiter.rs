//! The one thread per queue that blocks in `flock` for this process's waiting threads.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::linger::Linger;

/// The one thread per queue that blocks in `flock` on behalf of this process's waiting
/// threads, in their arrival order, and hands each its locked description (or releases it,
/// if the thread gave up meanwhile). `flock` has no timeout; a thread per wait would stay
/// blocked after its caller gave up, one more for every timed-out write behind a stuck
/// holder. The thread exits when no request came for [`WAITER_IDLE`].
#[derive(Debug, Default)]
pub(super) struct Waiter {
    state: Mutex<Waiting>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Waiting {
    requests: VecDeque<Request>,
    /// Whether the waiter thread runs.
    running: bool,
}

/// One thread's wait: its description of the sidecar, where to deliver it locked, and
/// whether it gave up.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) file: File,
    pub(super) deliver: mpsc::SyncSender<std::io::Result<File>>,
    pub(super) gave_up: Arc<AtomicBool>,
    /// The queue's linger, whose board names the next waiter when a lock taken for a thread
    /// that gave up is given back.
    pub(super) linger: Arc<Linger>,
}

/// How long the waiter thread stays for another request before it exits.
pub(super) const WAITER_IDLE: Duration = Duration::from_secs(5);

impl Waiter {
    /// Queues `request`, starting the waiter thread if none runs; gives the request back if
    /// no thread could be started (at the thread limit).
    pub(super) fn submit(self: &Arc<Self>, request: Request) -> std::result::Result<(), Request> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.requests.push_back(request);
        if state.running {
            self.arrived.notify_one();
            return Ok(());
        }
        let waiter = Arc::clone(self);
        match std::thread::Builder::new()
            .name("sqlite-persistence-queue".to_owned())
            .spawn(move || waiter.serve())
        {
            Ok(_) => {
                state.running = true;
                Ok(())
            }
            Err(_) => Err(state.requests.pop_back().expect("just queued")),
        }
    }

    fn serve(&self) {
        loop {
            let Request {
                file,
                deliver,
                gave_up,
                linger,
            } = {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(request) = state.requests.pop_front() {
                        break request;
                    }
                    let (next, wait) = self
                        .arrived
                        .wait_timeout(state, WAITER_IDLE)
                        .unwrap_or_else(PoisonError::into_inner);
                    state = next;
                    if wait.timed_out() && state.requests.is_empty() {
                        state.running = false;
                        return;
                    }
                }
            };
            if gave_up.load(Ordering::SeqCst) {
                continue;
            }
            // If the thread gave up while this blocked, the send fails and the file, and
            // with it the lock, is dropped; the board then names the next waiter, as any
            // holder giving the turn back does (else a seated waiter sleeps its backstop).
            if let Err(mpsc::SendError(Ok(file))) = deliver.send(file.lock().map(|()| file)) {
                drop(file);
                linger.released();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::queue::board::Board;
    use std::time::Instant;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_lock_taken_for_a_thread_that_gave_up_is_given_back_naming_the_next_seat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-lock");
        // Held by a description that names nobody when it lets go (an older version's).
        let holder = open(&path);
        holder.lock().unwrap();
        let board = Board::open(&open(&path)).unwrap();
        let linger = Arc::new(Linger::new(Some(Board::open(&open(&path)).unwrap())));
        let seat = board.sit(Instant::now()).unwrap();
        let generation = seat.generation();
        let waiter = Arc::new(Waiter::default());
        let (deliver, receiver) = mpsc::sync_channel(1);
        waiter
            .submit(Request {
                file: open(&path),
                deliver,
                gave_up: Arc::new(AtomicBool::new(false)),
                linger,
            })
            .unwrap();
        // The waiting thread gives up while the waiter thread blocks in `flock` for it.
        std::thread::sleep(Duration::from_millis(50));
        drop(receiver);
        drop(holder);
        let limit = Instant::now() + Duration::from_secs(10);
        while seat.generation() == generation && Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(seat.generation(), generation, "the seat was never woken");
        assert!(seat.may_try(), "the seat is named next");
    }
}
