//! `/metrics` served from a short-lived cache with a bound on the scrapes in
//! flight. Gathering the samples opens two control connections per VM, and
//! the endpoint is reachable by anything that reaches the node's port, a
//! guest included: however often it is asked, the agent gathers at most
//! once per [`ScrapeCache::max_age`], one gathering at a time, and refuses
//! (503) a request beyond [`ScrapeCache::max_waiting`] waiting ones instead
//! of queueing it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};

/// How long a rendered page is served again.
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// Requests that may wait for a page at once.
pub const MAX_WAITING: usize = 16;

/// Too many scrapes are in flight; the caller answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} scrapes are already in flight; try again")]
pub struct Busy(pub usize);

/// The last rendered page, and the one gathering in flight.
#[derive(Debug)]
pub struct ScrapeCache {
    max_age: Duration,
    max_waiting: usize,
    waiting: Semaphore,
    /// Held while a page is rendered, so only one is.
    latest: Mutex<Option<(Instant, Arc<str>)>>,
}

impl Default for ScrapeCache {
    fn default() -> Self {
        Self::new(MAX_AGE, MAX_WAITING)
    }
}

impl ScrapeCache {
    /// A cache that serves a page for `max_age` and lets `max_waiting`
    /// requests wait for one.
    pub fn new(max_age: Duration, max_waiting: usize) -> Self {
        Self {
            max_age,
            max_waiting,
            waiting: Semaphore::new(max_waiting),
            latest: Mutex::new(None),
        }
    }

    /// The page: the cached one while it is fresh, else one `render` makes
    /// (on a blocking thread). A request that finds a gathering in flight
    /// waits for it and gets its page.
    pub async fn page<F>(&self, render: F) -> Result<Arc<str>, Busy>
    where
        F: FnOnce() -> String + Send + 'static,
    {
        let _permit = self
            .waiting
            .try_acquire()
            .map_err(|_| Busy(self.max_waiting))?;
        let mut latest = self.latest.lock().await;
        if let Some((at, page)) = latest.as_ref()
            && at.elapsed() < self.max_age
        {
            return Ok(page.clone());
        }
        let page: Arc<str> = tokio::task::spawn_blocking(render)
            .await
            .unwrap_or_default()
            .into();
        *latest = Some((Instant::now(), page.clone()));
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(renders: &Arc<AtomicUsize>, delay: Duration) -> impl FnOnce() -> String + use<> {
        let renders = renders.clone();
        move || {
            let n = renders.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(delay);
            format!("page {n}")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_scrapes_render_once() {
        let cache = Arc::new(ScrapeCache::new(Duration::from_secs(60), 64));
        let renders = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, render) =
                    (cache.clone(), counting(&renders, Duration::from_millis(50)));
                tokio::spawn(async move { cache.page(render).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(&*t.await.unwrap().unwrap(), "page 1");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_page_is_rendered_again() {
        let cache = ScrapeCache::new(Duration::ZERO, 4);
        let renders = Arc::new(AtomicUsize::new(0));
        for n in 1..=3 {
            let page = cache
                .page(counting(&renders, Duration::ZERO))
                .await
                .unwrap();
            assert_eq!(&*page, format!("page {n}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_beyond_the_bound_are_refused_not_queued() {
        let cache = Arc::new(ScrapeCache::new(Duration::from_secs(60), 2));
        let renders = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // One request renders (blocked until the test lets it go), one waits.
        let slow = {
            let (cache, renders) = (cache.clone(), renders.clone());
            tokio::spawn(async move {
                cache
                    .page(move || {
                        renders.fetch_add(1, Ordering::SeqCst);
                        rx.recv().ok();
                        "slow".to_owned()
                    })
                    .await
            })
        };
        while renders.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let waiter = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.page(|| "never".to_owned()).await })
        };
        while cache.waiting.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.page(|| "third".to_owned()).await, Err(Busy(2)));
        tx.send(()).unwrap();
        assert_eq!(&*slow.await.unwrap().unwrap(), "slow");
        assert_eq!(&*waiter.await.unwrap().unwrap(), "slow");
        assert_eq!(renders.load(Ordering::SeqCst), 1);
    }
}
