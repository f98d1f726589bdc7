//! VMM exits, seen when they happen: each VMM the agent started or adopted
//! has a task that waits for its end (a pidfd) and then asks for a reconcile
//! of its MicroVM, which records the exit and applies the run policy (a
//! restart after its backoff). Without this, a crash would be seen only at
//! the VM's next periodic reconcile. Works while the API is unreachable: the
//! controller reconciles from its cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::future::BoxFuture;
use kube::runtime::reflector::ObjectRef;
use runv_crds::MicroVM;

use crate::host::VmmIdentity;
use crate::runtime::VmRef;

/// The VMMs being waited on, one per VM, and where their exits are sent.
#[derive(Debug)]
pub struct Exits {
    tx: UnboundedSender<ObjectRef<MicroVM>>,
    watching: Arc<Mutex<HashMap<VmRef, VmmIdentity>>>,
}

impl Exits {
    /// A new set, and the stream of MicroVMs whose VMM exited (for
    /// `Controller::reconcile_on`).
    pub fn new() -> (Self, UnboundedReceiver<ObjectRef<MicroVM>>) {
        let (tx, rx) = unbounded();
        let exits = Self {
            tx,
            watching: Arc::default(),
        };
        (exits, rx)
    }

    /// Asks for a reconcile of the MicroVM a key `namespace/name` names
    /// (a guest reported something).
    pub fn requester(&self) -> crate::host::guest::OnChange {
        let tx = self.tx.clone();
        Arc::new(move |key: &str| {
            if let Some((namespace, name)) = key.split_once('/') {
                let _ = tx.unbounded_send(ObjectRef::new(name).within(namespace));
            }
        })
    }

    /// Waits on `vmm` (the VM's recorded VMM and its exit, from
    /// [`crate::runtime::Runtime::exit_watch`]) unless that one is waited on
    /// already. Needs a tokio runtime.
    pub fn watch(
        &self,
        vm: &VmRef,
        key: ObjectRef<MicroVM>,
        vmm: Option<(VmmIdentity, BoxFuture<'static, ()>)>,
    ) {
        let Some((id, exited)) = vmm else {
            return;
        };
        {
            let mut watching = lock(&self.watching);
            if watching.get(vm) == Some(&id) {
                return;
            }
            watching.insert(vm.clone(), id);
        }
        let (tx, watching, vm) = (self.tx.clone(), self.watching.clone(), vm.clone());
        tokio::spawn(async move {
            exited.await;
            {
                let mut watching = lock(&watching);
                if watching.get(&vm) == Some(&id) {
                    watching.remove(&vm);
                }
            }
            tracing::debug!(%vm, pid = id.pid, "VMM exited");
            // Closed only when the controller has stopped.
            let _ = tx.unbounded_send(key);
        });
    }

    /// How many VMMs are waited on.
    pub fn len(&self) -> usize {
        lock(&self.watching).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn vm(name: &str) -> (VmRef, ObjectRef<MicroVM>) {
        let r = VmRef {
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
        };
        (r, ObjectRef::new(name).within("default"))
    }

    #[tokio::test]
    async fn an_exit_asks_for_its_vm_and_a_vmm_is_waited_on_once() {
        let (exits, mut rx) = Exits::new();
        let (r, key) = vm("a");
        let id = VmmIdentity {
            pid: 7,
            start_ticks: 1,
        };
        let (done, wait) = futures::channel::oneshot::channel::<()>();
        let exited: BoxFuture<'static, ()> = Box::pin(async move {
            let _ = wait.await;
        });
        exits.watch(&r, key.clone(), Some((id, exited)));
        // The same VMM again: not a second waiter (it would never resolve).
        exits.watch(
            &r,
            key.clone(),
            Some((id, Box::pin(std::future::pending()))),
        );
        exits.watch(&r, key.clone(), None);
        assert_eq!(exits.len(), 1);
        done.send(()).unwrap();
        assert_eq!(rx.next().await, Some(key));
        assert!(exits.is_empty());
    }
}
