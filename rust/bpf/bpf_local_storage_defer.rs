// SPDX-License-Identifier: GPL-2.0

//! NMI-safe deferred freeing of BPF local storage.
//!
//! An element unlinked by `bpf_selem_unlink()`, an element replaced by
//! `bpf_local_storage_update()` and a storage freed with its last element may still be read by
//! programs, sleepable ones included, and by syscalls. They may be freed only after a full Tasks
//! Trace RCU grace period that started after the unlink. The C code used to call
//! `call_rcu_tasks_trace()` once per object from the program's own context; that is `call_srcu()`,
//! which is not allowed in NMI, so deleting from an NMI program was refused.
//!
//! This engine takes the objects from any context, NMI included, and frees them in batches:
//!
//! - **Producer** ([`Engine::queue`], any context): one `llist_add()` on the current CPU's
//!   `pending` list and, only if that list was empty, one `irq_work_queue()` of the CPU's hard
//!   irq_work. No lock, no allocation, no `call_rcu*()`.
//! - **irq_work handler** (hard interrupt, on the CPU that queued it): takes the CPU's *token*,
//!   the right to own its one `rcu_head` and in-flight `batch`. If no grace period is in flight
//!   it takes all of `pending` as the batch and starts *one* `call_rcu_tasks_trace()` for it.
//! - **RCU callback** (after the grace period, any CPU, bottom halves disabled): frees at most
//!   [`FREE_CHUNK`] objects of the batch. If that was all of it, it takes `pending` again: if
//!   items arrived meanwhile it starts the next grace period for them (the chain), otherwise it
//!   gives the token back. If not, it hands the token, with the rest of the batch, to the CPU's
//!   **free work**, which frees [`FREE_CHUNK`] objects per run on `system_dfl_wq` and
//!   queues itself again until the batch is empty (the worker reschedules between runs), then
//!   chains or gives the token back exactly as the callback would.
//!
//! So each CPU has at most one grace period in flight, a batch is snapshotted when its grace
//! period starts (later items wait for the next one, never join it), no step frees more than
//! [`FREE_CHUNK`] objects without a chance to reschedule, and every item is in exactly one of:
//! `pending`, the in-flight `batch`, a flush's `drained` or `freeing` list, or freed.
//!
//! # The token and why nothing is stranded
//!
//! `in_flight` is 1 while someone owns `{batch, rcu, free_work}`: a handler or a hotplug kick
//! between taking the token and starting a grace period, then the grace period, its callback and
//! the free work if the batch was large. The token passes from one to the next, never back to
//! nobody in between; the free work is queued only by the token owner, so it is never queued
//! twice, and while it holds the token no grace period of this CPU is in flight. It is
//! taken with a fully ordered `xchg(1)`. The owner that finds `pending` empty gives it back with
//! a fully ordered `xchg(0)` and then looks at `pending` once more, taking the token again if it
//! is not empty. Why this suffices: a producer that finds `pending` empty queues the irq_work,
//! whose handler runs after the `llist_add()`. If that handler finds the token taken, its `xchg`
//! comes before the owner's releasing `xchg(0)` in the token's modification order, and the
//! releasing `xchg` reads the value the handler wrote; both being fully ordered, the owner's
//! re-check after the release sees the item (store->load ordering: a plain release store would
//! not do). A producer that finds `pending` non-empty adds its item on top of one that has
//! not been taken yet and is handled with it, since a list is only ever taken whole.
//!
//! # Flush
//!
//! [`Engine::flush`] frees, before it returns, every item queued before it was called: what an
//! engine needs before it is dropped (the kernel's two engines never are; the KUnit tests' are).
//! `rcu_barrier_tasks_trace()` alone does not do: items may sit in `pending` with no callback
//! queued for them, and a callback that re-arms queues a new callback the barrier does not wait
//! for. Per CPU, `started` counts the batches taken (incremented by the token owner *before*
//! its `llist_del_all()`) and `completed` the batches finished (incremented only after the
//! whole batch is freed, by the callback or the free work, or right away if the take was
//! empty). A flush:
//!
//! 1. syncs the irq_work of every online CPU, so that no handler is half-way through a take;
//! 2. under `take_lock` (short, never held across a wait): takes every possible CPU's `pending`
//!    onto that CPU's `drained` list (offline CPUs included), stores that CPU's `started` in its
//!    `flush_target`, and draws a ticket, one more than the last;
//! 3. under `free_lock`, unless a flusher that moved `drained` after our step 2 has already
//!    freed it (`free_lock` holds the last ticket whose items are freed): moves every
//!    `drained` list to `freeing` and notes the last ticket drawn (under `take_lock`), waits for
//!    one grace period (`synchronize_rcu_tasks_trace()`) and frees what it moved, in chunks of
//!    [`FREE_CHUNK`] with migration disabled and a rescheduling point between chunks;
//! 4. without a lock, calls `rcu_barrier_tasks_trace()` (and gives the free work time) until
//!    every CPU's `completed` reaches its `flush_target`.
//!
//! An item queued before the flush is either still in `pending` at step 2 (the flush takes it
//! onto `drained`, and it is freed by this flush's step 3 or by that of a flusher that moved it
//! after our take, before the ticket we check is published) or was taken before by an owner
//! whose `started` increment precedes its `llist_del_all()`, which precedes the flush's in the
//! list's modification order: both being fully ordered, the flush reads a `started` that counts
//! that batch, and waits until it is freed. A `flush_target` read at step 4 may have been
//! stored by a later flusher: it is larger, still counts only batches taken before that
//! flusher's step 2, and `started - completed <= 1` bounds the wait by one grace period.
//!
//! Concurrent flushes share their grace periods: flushers that draw tickets while one is in
//! step 3 queue on `free_lock`, and the first of them to get it frees what all of them took
//! after one more grace period; the others find their ticket covered and only wait in step 4,
//! which needs no lock.
//!
//! # Map free
//!
//! `bpf_local_storage_map_free()` must not free the map's `btf_record` while an element of the
//! map waits here: [`Selem`]'s free reads it (`bpf_obj_free_fields()`). It does not flush: a
//! flush would free, and wait for, every CPU's batches of every map, a grace period or two and
//! as many frees as the other maps' deletes queued. Instead each map counts its elements that
//! the engine holds, in `smap->deferred`, and map free waits for that count to be 0:
//!
//! - [`bpf_selem_free_deferred`] increments it before the element is queued. Its caller holds a
//!   reference to the map (a program that uses the map, a syscall on its fd, an update), and
//!   every reference is dropped with a fully ordered atomic before map free runs, so map free
//!   reads every increment and none can follow;
//! - [`Selem`]'s free decrements it, fully ordered, after `bpf_obj_free_fields()` and
//!   `kfree()`: its last access to the map. If that made it 0 it calls `wake_up_var()`, which
//!   only hashes the address (the map may be gone by then). Map free reads 0 with acquire
//!   ordering, so its frees come after the element's.
//!
//! An element is never flushed and the chain frees it on its own (nothing is stranded, see
//! above), a grace period or two after its queueing; so map free waits for its own elements and
//! for no other map's, takes no lock, and maps freed together do not wait for each other. A
//! reader that holds a grace period holds it up, as it holds up `rcu_barrier_tasks_trace()`.
//! Storages are not counted: freeing one never reads a map. Once the engine is ready no element
//! is freed by `call_rcu_tasks_trace()`, so no RCU callback reads a map, and map free skips the
//! `rcu_barrier_tasks_trace()` and `rcu_barrier()` it does without the engine.
//!
//! # CPU hotplug
//!
//! A producer running on a CPU that is not online (the window between `__cpu_disable()` and
//! death, or during bring-up, where only NMIs can produce) does not queue the irq_work: it
//! would be left pending on a dead CPU, and `irq_work_queue()` would then refuse to queue it
//! again once the CPU is back. Its items wait in `pending` for [`Engine::kick_cpu`], which the
//! engine calls from a CPU hotplug "dead" callback (on a control CPU, once the CPU is gone) and
//! from an "online" callback (on the CPU, once it is up again). Everything queued while the CPU
//! was online had its irq_work run by `smpcfd_dying_cpu()` before the CPU went down; a chain
//! already in flight runs its callbacks on other CPUs. A flush also takes offline CPUs' lists;
//! map free does not need them taken, it waits for the kicks.
//!
//! # Statistics
//!
//! Per-CPU counters are in `/sys/kernel/debug/bpf_local_storage_defer/stats`; the format is
//! documented at [`StatsFile`].
//!
//! C header: [`include/linux/bpf_local_storage.h`](srctree/include/linux/bpf_local_storage.h)

use core::{
    cell::UnsafeCell,
    fmt,
    ptr::NonNull, //
};
use kernel::{
    bindings,
    cpu::CpuId,
    debugfs::Dir,
    impl_has_irq_work,
    impl_has_llist_node_c,
    impl_has_work,
    irq_work::{
        IrqWork,
        IrqWorkHandler, //
    },
    llist::{
        HasLListNode,
        LListBatch,
        LListHead, //
    },
    percpu::{
        self,
        MigrateDisabled,
        PerCpu, //
    },
    prelude::*,
    sync::{
        atomic::{
            Acquire,
            Atomic,
            Full,
            Relaxed,
            Release, //
        },
        new_mutex,
        rcu_tasks_trace::{
            self,
            impl_has_rcu_head,
            RcuHead,
            RcuTasksTraceCallback, //
        },
        Mutex,
        SetOnce, //
    },
    task::might_sleep,
    time::{
        delay::fsleep,
        Delta,
        Instant,
        Monotonic, //
    },
    types::Opaque,
    warn_on,
    workqueue::{
        self,
        new_work,
        HasWork,
        RawWorkItem,
        Work,
        WorkItem,
        WorkItemPointer, //
    }, //
};

const __LOG_PREFIX: &[u8] = b"bpf_local_storage_defer\0";

/// Most objects freed in one step without a chance to reschedule: in one RCU callback (which
/// runs with bottom halves disabled), in one run of the free work, or between two rescheduling
/// points of a flush.
///
/// Stock 7.3 frees one object per callback; a batch freed in one callback could hold as many
/// objects as were deleted on its CPU during a grace period that a sleepable program held for
/// seconds.
const FREE_CHUNK: usize = 64;

/// How long [`Engine::flush`] waits for a batch before it says so in the kernel log.
const FLUSH_STALL_MS: i64 = 10_000;

/// An object freed by an [`Engine`].
pub trait DeferFree: HasLListNode + Send + Sized + 'static {
    /// Frees `obj`, whose Tasks Trace RCU grace period has elapsed.
    ///
    /// Called once for every object passed to [`Engine::queue`], from an RCU callback (bottom
    /// halves disabled), from the engine's free work or from [`Engine::flush`] (process context,
    /// migration disabled); never from hard interrupt or NMI context. It must not sleep.
    ///
    /// # Safety
    ///
    /// `obj` was passed to [`Engine::queue`] and ownership of it passes back to the callee.
    unsafe fn free(obj: NonNull<Self>);

    /// Called by the token owner right after it took `pending`, before it starts a grace period
    /// for what it took: the KUnit tests stop an owner there (see
    /// `flush_counts_a_batch_being_taken`).
    #[cfg(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)]
    fn after_take() {}
}

/// Per-CPU counters, for observability only.
///
/// They are `usize` so that NMI producers update them with native atomics, and they wrap.
struct Stats {
    /// Objects queued on this CPU.
    queued: Atomic<usize>,
    /// Batches freed by the chain (one per grace period) or by a flush.
    batches: Atomic<usize>,
    /// Grace periods started by the chain (`call_rcu_tasks_trace()`).
    gps: Atomic<usize>,
    /// Objects of this CPU's lists freed, by the chain or by a flush.
    freed: Atomic<usize>,
    /// Objects of this CPU's lists freed by a flush.
    flushed: Atomic<usize>,
    /// Largest `queued - freed` seen by a producer (approximate).
    max_pending: Atomic<usize>,
    /// Batches whose frees continued in the free work.
    offloads: Atomic<usize>,
    /// Most objects freed in one step.
    max_step: Atomic<usize>,
    /// Longest step, in nanoseconds.
    max_step_ns: Atomic<usize>,
}

/// Raises `max` to `v` if `v` is larger.
fn record_max(max: &Atomic<usize>, v: usize) {
    let mut cur = max.load(Relaxed);
    while v > cur {
        match max.cmpxchg(cur, v, Relaxed) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

impl Stats {
    const fn new() -> Self {
        Self {
            queued: Atomic::new(0),
            batches: Atomic::new(0),
            gps: Atomic::new(0),
            freed: Atomic::new(0),
            flushed: Atomic::new(0),
            max_pending: Atomic::new(0),
            offloads: Atomic::new(0),
            max_step: Atomic::new(0),
            max_step_ns: Atomic::new(0),
        }
    }
}

/// A snapshot of one CPU's counters of an [`Engine`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Objects queued on this CPU.
    pub queued: usize,
    /// Batches freed (one per grace period of the chain, one per flush that found items).
    pub batches: usize,
    /// Grace periods started by the chain.
    pub gps: usize,
    /// Objects freed.
    pub freed: usize,
    /// Objects freed by a flush.
    pub flushed: usize,
    /// Largest number of queued, not yet freed objects seen by a producer (approximate).
    pub max_pending: usize,
    /// Batches whose frees continued in the free work (more than [`FREE_CHUNK`] objects).
    pub offloads: usize,
    /// Most objects freed in one step without a chance to reschedule.
    pub max_step: usize,
    /// Longest such step, in nanoseconds.
    pub max_step_ns: usize,
}

impl CpuStats {
    fn accumulate(&mut self, o: &CpuStats) {
        self.queued = self.queued.wrapping_add(o.queued);
        self.batches = self.batches.wrapping_add(o.batches);
        self.gps = self.gps.wrapping_add(o.gps);
        self.freed = self.freed.wrapping_add(o.freed);
        self.flushed = self.flushed.wrapping_add(o.flushed);
        self.max_pending = self.max_pending.max(o.max_pending);
        self.offloads = self.offloads.wrapping_add(o.offloads);
        self.max_step = self.max_step.max(o.max_step);
        self.max_step_ns = self.max_step_ns.max(o.max_step_ns);
    }
}

/// The per-CPU part of an [`Engine`].
///
/// # Invariants
///
/// - `in_flight` is 0 or 1; while it is 1, exactly one owner (a handler, a kick, a grace period
///   and its callback, or the free work) has exclusive access to `batch`, `rcu` and
///   `free_work`.
/// - While nobody owns the token, `batch` is empty, `rcu` is not queued and `free_work` is
///   neither queued nor about to be.
/// - `drained` is only accessed with the engine's `take_lock` held, `freeing` only with its
///   `free_lock` held; `freeing` is empty outside step 3 of [`Engine::flush`].
/// - `completed` never passes `started`, and `started - completed` is 0 or 1 (one batch at a
///   time); both are only modified by the token owner.
#[pin_data]
struct CpuState<T: DeferFree> {
    pending: LListHead<T>,
    in_flight: Atomic<u32>,
    batch: UnsafeCell<LListBatch<T>>,
    drained: UnsafeCell<LListBatch<T>>,
    freeing: UnsafeCell<LListBatch<T>>,
    started: Atomic<usize>,
    completed: Atomic<usize>,
    flush_target: Atomic<usize>,
    stats: Stats,
    #[pin]
    work: IrqWork<CpuState<T>>,
    rcu: RcuHead<CpuState<T>>,
    #[pin]
    free_work: Work<CpuState<T>>,
}

// SAFETY: `batch` is only accessed by the token owner, `drained` and `freeing` only with the
// engine's locks held (see the type invariants); every other field is atomic or designed for
// concurrent use.
unsafe impl<T: DeferFree> Sync for CpuState<T> {}

impl_has_irq_work! {
    impl{T: DeferFree} HasIrqWork for CpuState<T> { self.work }
}

impl_has_rcu_head! {
    impl{T: DeferFree} HasRcuHead for CpuState<T> { self.rcu }
}

impl<T: DeferFree> CpuState<T> {
    fn new() -> impl PinInit<Self> {
        // INVARIANT: Nobody owns the token, the batches are empty, the counters are equal.
        pin_init!(Self {
            pending: LListHead::new(),
            in_flight: Atomic::new(0),
            batch: UnsafeCell::new(LListBatch::new()),
            drained: UnsafeCell::new(LListBatch::new()),
            freeing: UnsafeCell::new(LListBatch::new()),
            started: Atomic::new(0),
            completed: Atomic::new(0),
            flush_target: Atomic::new(0),
            stats: Stats::new(),
            work <- IrqWork::new_hard(),
            rcu: RcuHead::new(),
            free_work <- new_work!("bpf_local_storage_defer"),
        })
    }

    /// Starts a batch unless a grace period is in flight. Any context but NMI.
    fn kick(&self) {
        // Fully ordered: if the token was free, we see everything its last owner did.
        if self.in_flight.xchg(1, Full) != 0 {
            // The owner takes `pending` again before it gives the token back (see the module
            // documentation), so whatever is there now is not stranded.
            return;
        }
        // SAFETY: We took the token.
        unsafe { self.start_or_release() };
    }

    /// Takes `pending` and starts a grace period for it, or gives the token back if it is empty.
    ///
    /// # Safety
    ///
    /// The caller owns the token and `batch` is empty.
    unsafe fn start_or_release(&self) {
        loop {
            // Counted before the take: `llist_del_all()` is a fully ordered `xchg()`, so a flush
            // that takes `pending` after us and then reads `started` sees this increment.
            self.started.fetch_add(1, Relaxed);
            let batch = self.pending.del_all();
            #[cfg(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)]
            T::after_take();
            if !batch.is_empty() {
                // SAFETY: We own the token, hence `batch`, which the caller left empty.
                unsafe { *self.batch.get() = batch };
                self.stats.gps.fetch_add(1, Relaxed);
                // Use call_rcu_tasks_trace() to wait for sleepable programs, and syscalls
                // reading under rcu_read_lock_trace(), that may still see these objects: they
                // were all unlinked before this point, so the grace period starts after every
                // unlink. It implies a regular RCU grace period, so the callback may kfree().
                //
                // SAFETY: We own the token, so `rcu` is not queued, and it stays ours until the
                // callback gives the token back. `self` lives until the engine is dropped, which
                // waits for callbacks with `rcu_barrier_tasks_trace()`.
                unsafe { self.rcu.call_rcu_tasks_trace() };
                return;
            }

            // An empty take completes at once. Release: a flush that reads `completed` with
            // acquire sees everything this owner did before.
            self.completed.fetch_add(1, Release);
            // SAFETY: We own the token; `batch` is empty, `rcu` and `free_work` are not queued.
            if !unsafe { self.release() } {
                return;
            }
        }
    }

    /// Gives the token back, then looks at `pending` once more and takes the token again if
    /// items arrived meanwhile: their producer's handler may have found the token taken and
    /// given up. Returns `true` if the caller owns the token again.
    ///
    /// # Safety
    ///
    /// The caller owns the token; `batch` is empty and neither `rcu` nor `free_work` is queued.
    unsafe fn release(&self) -> bool {
        // SAFETY: We own the token, hence `batch`.
        let leftover = unsafe { !(*self.batch.get()).is_empty() };
        warn_on!(leftover);
        // INVARIANT: `batch` is empty, `rcu` is not queued and `free_work` is not queued (only
        // the owner queues it, and it queues it last): the token may go.
        // Fully ordered, so that the re-check below cannot be satisfied before the release: a
        // handler that found the token taken wrote it after its producer's llist_add(), and this
        // xchg() reads that write.
        self.in_flight.xchg(0, Full);
        if self.pending.is_empty() {
            return false;
        }
        // Take the token back, unless someone else just did: then they take the items.
        self.in_flight.xchg(1, Full) == 0
    }

    /// Frees at most [`FREE_CHUNK`] objects of `batch`, one step; returns how many.
    ///
    /// Counts them as freed by this CPU's lists (and as flushed if `flushed`), and records the
    /// step's size and duration.
    fn free_chunk(&self, batch: &mut LListBatch<T>, flushed: bool) -> usize {
        let start = Instant::<Monotonic>::now();
        let mut n: usize = 0;
        while n < FREE_CHUNK {
            let Some(obj) = batch.next() else { break };
            // SAFETY: Every object of a batch was passed to `Engine::queue` and its grace period
            // has elapsed; the batch hands it back to us and we pass it on.
            unsafe { T::free(obj) };
            // No overflow: `n < FREE_CHUNK`.
            n += 1;
        }
        self.stats.freed.fetch_add(n, Relaxed);
        if flushed {
            self.stats.flushed.fetch_add(n, Relaxed);
        }
        record_max(&self.stats.max_step, n);
        let ns = usize::try_from(start.elapsed().as_nanos()).unwrap_or(usize::MAX);
        record_max(&self.stats.max_step_ns, ns);
        n
    }

    /// Frees the next step of the in-flight batch; then, if it is empty, completes it and chains
    /// or gives the token back, otherwise hands the token to the free work.
    ///
    /// `from_callback` tells whether this is the first step, in the RCU callback.
    ///
    /// # Safety
    ///
    /// The caller owns the token and `batch` holds the in-flight batch.
    unsafe fn free_step(&self, from_callback: bool) {
        // SAFETY: The caller owns the token, hence `batch`.
        let batch = unsafe { &mut *self.batch.get() };
        self.free_chunk(batch, false);
        if !batch.is_empty() {
            // The token, and the rest of the batch, pass to the free work. It is not queued:
            // only the token owner queues it, which is us.
            if from_callback {
                self.stats.offloads.fetch_add(1, Relaxed);
            }
            // INVARIANT: The reference goes with the token.
            let queued = free_queue().enqueue(TokenRef(NonNull::from(self)));
            warn_on!(!queued);
            return;
        }
        self.stats.batches.fetch_add(1, Relaxed);
        // Release: the frees above happen before a flush that sees this count returns.
        self.completed.fetch_add(1, Release);
        // Chain: start the next grace period for what arrived meanwhile, or give the token
        // back. Callbacks may queue callbacks: `call_srcu()` from an SRCU callback is fine, and
        // so it is from a work item.
        //
        // SAFETY: We own the token and `batch` is empty again.
        unsafe { self.start_or_release() };
    }

    /// Waits until the free work is neither queued nor running (`flush_work()`).
    fn sync_free_work(&self) {
        // SAFETY: `free_work` is an initialised `work_struct` (pinned in `self`), which
        // `flush_work()` may be called on at any time from a context that may sleep.
        unsafe { bindings::flush_work(Work::raw_get(&raw const self.free_work)) };
    }

    fn snapshot(&self) -> CpuStats {
        CpuStats {
            queued: self.stats.queued.load(Relaxed),
            batches: self.stats.batches.load(Relaxed),
            gps: self.stats.gps.load(Relaxed),
            freed: self.stats.freed.load(Relaxed),
            flushed: self.stats.flushed.load(Relaxed),
            max_pending: self.stats.max_pending.load(Relaxed),
            offloads: self.stats.offloads.load(Relaxed),
            max_step: self.stats.max_step.load(Relaxed),
            max_step_ns: self.stats.max_step_ns.load(Relaxed),
        }
    }
}

impl<T: DeferFree> IrqWorkHandler for CpuState<T> {
    /// Runs in hard interrupt context, also on `PREEMPT_RT`, where `call_srcu()` is allowed: it
    /// takes only raw spinlocks in this kernel.
    fn run(this: &Self) {
        this.kick();
    }
}

impl<T: DeferFree> RcuTasksTraceCallback for CpuState<T> {
    /// Runs after the grace period of the in-flight batch, on any CPU, bottom halves disabled:
    /// one step of at most [`FREE_CHUNK`] objects, the rest in the free work.
    fn run(this: &Self) {
        let in_flight = this
            .started
            .load(Relaxed)
            .wrapping_sub(this.completed.load(Relaxed));
        warn_on!(in_flight != 1);
        // SAFETY: The grace period (and so this callback) owns the token, hence `batch`, which
        // holds the batch the grace period was started for.
        unsafe { this.free_step(true) };
    }
}

/// The queue of the free work: `system_dfl_wq`, the unbound system workqueue (this kernel
/// deprecates its old name, `system_unbound_wq`, which is all `kernel::workqueue` wraps).
fn free_queue() -> &'static workqueue::Queue {
    // SAFETY: `system_dfl_wq` is set up before any initcall runs and never freed; reading the
    // pointer races with nothing.
    unsafe { workqueue::Queue::from_raw(bindings::system_dfl_wq) }
}

/// The token owner's reference to a [`CpuState`], which the RCU callback hands to the free work
/// with the rest of a large batch, and each run of the free work to the next.
///
/// # Invariants
///
/// Points to a [`CpuState`] whose token the holder owns. The state lives until its engine is
/// dropped, which waits for the free work (`flush_work()`) after the last batch completed.
struct TokenRef<T: DeferFree>(NonNull<CpuState<T>>);

// SAFETY: `CpuState` is `Sync`, and the token, which is all that the reference stands for, may be
// owned by any thread: the work runs on any CPU.
unsafe impl<T: DeferFree> Send for TokenRef<T> {}

impl_has_work! {
    impl{T: DeferFree} HasWork<CpuState<T>> for CpuState<T> { self.free_work }
}

// SAFETY: `__enqueue` passes the `work_struct` of the state's `free_work`, which `CpuState::new`
// initialised with `<TokenRef<T> as WorkItemPointer>::run` (through `Work::new` and
// `WorkItem::Pointer`). By the type invariants the state outlives the work's run.
unsafe impl<T: DeferFree> RawWorkItem<0> for TokenRef<T> {
    /// Whether the work was queued: always, since only the token owner queues it.
    type EnqueueOutput = bool;

    unsafe fn __enqueue<F>(self, queue_work_on: F) -> bool
    where
        F: FnOnce(*mut bindings::work_struct) -> bool,
    {
        // SAFETY: By the type invariants, `self.0` points to a valid state.
        let work = unsafe { Work::raw_get(&raw const (*self.0.as_ptr()).free_work) };
        queue_work_on(work)
    }
}

// SAFETY: `run` is the function `free_work` was initialised with; it only converts the
// `work_struct` back to the state it is embedded in.
unsafe impl<T: DeferFree> WorkItemPointer<0> for TokenRef<T> {
    unsafe extern "C" fn run(ptr: *mut bindings::work_struct) {
        // `Work<T>` is `repr(transparent)` over `Opaque<bindings::work_struct>`.
        let work = ptr.cast::<Work<CpuState<T>>>();
        // SAFETY: The work was queued by `__enqueue`, from the `free_work` field of a valid
        // state that lives until the work has run.
        let state = unsafe { <CpuState<T> as HasWork<CpuState<T>>>::work_container_of(work) };
        // SAFETY: As above, `state` is not null.
        let state = unsafe { NonNull::new_unchecked(state) };
        // INVARIANT: The token passed to this run of the work with the queueing.
        <CpuState<T> as WorkItem>::run(TokenRef(state))
    }
}

impl<T: DeferFree> WorkItem for CpuState<T> {
    type Pointer = TokenRef<T>;

    /// Process context, on any CPU: one step of at most [`FREE_CHUNK`] objects with migration
    /// disabled (a percpu kptr's drop uses `this_cpu_ptr()`); the next step is queued anew, so
    /// that the worker reschedules in between.
    fn run(this: TokenRef<T>) {
        // SAFETY: By the type invariants of `TokenRef`, the state is valid.
        let st = unsafe { this.0.as_ref() };
        let _pin = MigrateDisabled::new();
        // SAFETY: The work owns the token, and `batch` holds the rest of the in-flight batch.
        unsafe { st.free_step(false) };
    }
}

/// A deferred-free engine for objects of type `T`: see the module documentation.
///
/// # Invariants
///
/// `pcpu` holds the state of every possible CPU; it is only dropped after no handler, callback
/// or free work can run on it any more.
#[pin_data(PinnedDrop)]
pub struct Engine<T: DeferFree> {
    pcpu: PerCpu<CpuState<T>>,
    /// Owns every CPU's `drained`; holds the last flush ticket drawn.
    #[pin]
    take_lock: Mutex<usize>,
    /// Owns every CPU's `freeing`; holds the last flush ticket whose items are freed.
    #[pin]
    free_lock: Mutex<usize>,
}

impl<T: DeferFree> Engine<T> {
    /// Creates an engine. Must be called from a context that may sleep.
    pub fn new() -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            pcpu: PerCpu::new(|_| CpuState::new())?,
            take_lock <- new_mutex!(0),
            free_lock <- new_mutex!(0),
        }? Error)
    }

    fn state(&self, cpu: CpuId) -> Option<&CpuState<T>> {
        self.pcpu.get(cpu).map(Pin::get_ref)
    }

    /// Queues `obj` to be freed after a Tasks Trace RCU grace period.
    ///
    /// Callable from any context, NMI included, also nested (an NMI interrupting a producer on
    /// the same CPU): one `llist_add()`, and one `irq_work_queue()` when the CPU's list was
    /// empty.
    ///
    /// # Safety
    ///
    /// - `obj` must point to a valid `T` whose node is on no list, and ownership of it passes to
    ///   the engine, which hands it to [`DeferFree::free`].
    /// - No new reader may find `obj` any more: readers that may still hold it are inside a
    ///   Tasks Trace RCU read-side critical section that started before this call.
    pub unsafe fn queue(&self, obj: NonNull<T>) {
        self.pcpu.with_local(|cpu, st| {
            let st = st.get_ref();
            // Counted first, so that `freed` never overtakes `queued` for `max_pending`.
            let queued = st.stats.queued.fetch_add(1, Relaxed).wrapping_add(1);
            // SAFETY: The caller passes ownership of a valid object whose node is free.
            let was_empty = unsafe { st.pending.add(obj) };
            if was_empty && percpu::cpu_online(cpu) {
                // With preemption disabled, this CPU cannot go offline before its dying step
                // runs the irq_work; an offline CPU is handled by `kick_cpu()` (module docs).
                //
                // SAFETY: `st` lives until the engine is dropped, after `flush()` has synced
                // every online CPU's irq_work.
                unsafe { st.work.queue() };
            }
            let outstanding = queued.wrapping_sub(st.stats.freed.load(Relaxed));
            if outstanding <= isize::MAX as usize
                && outstanding > st.stats.max_pending.load(Relaxed)
            {
                st.stats.max_pending.store(outstanding, Relaxed);
            }
        })
    }

    /// Starts a batch for `cpu` unless a grace period is already in flight for it.
    ///
    /// Called for CPU hotplug: on a control CPU once `cpu` is dead, and on `cpu` once it is
    /// online again, to pick up objects queued while it was not online. Any context but NMI.
    pub fn kick_cpu(&self, cpu: CpuId) {
        if let Some(st) = self.state(cpu) {
            st.kick();
        }
    }

    /// Frees every object queued before the call, then returns.
    ///
    /// Sleeps; must not be called inside a Tasks Trace RCU read-side critical section. Concurrent
    /// flushes share their grace periods (see the module documentation).
    pub fn flush(&self) {
        self.flush_within(None);
    }

    /// [`Engine::flush`]; with a `limit`, it stops waiting for the batches owners had taken
    /// (step 4) once `limit` has passed and returns `false`: something queued before the call
    /// may then not be freed yet, so the engine must not be dropped. For tests, which must fail
    /// rather than hang when a broken chain never completes a batch.
    ///
    /// A wait of [`FLUSH_STALL_MS`] or longer is reported in the kernel log, with what it waits
    /// for, and again each time the wait doubles.
    fn flush_within(&self, limit: Option<Delta>) -> bool {
        // Step 1: a handler half-way through a take (token taken, call_rcu_tasks_trace() not
        // made yet) would make the barriers of step 4 return early and loop; let every running
        // or pending handler finish first. Offline CPUs run none, and never have one pending
        // (see `queue()`).
        for cpu in percpu::possible_cpus() {
            if let Some(st) = self.state(cpu) {
                if percpu::cpu_online(cpu) {
                    st.work.sync();
                }
            }
        }

        // Step 2: take what no one has taken yet, offline CPUs included: remote
        // llist_del_all() is safe against concurrent llist_add(). Then read how many batches
        // the CPU's owners have taken so far. The take is a fully ordered xchg(): an owner
        // whose own take came first in `pending`'s modification order had incremented
        // `started` before it, so the read below counts its batch. `started` only grows, and
        // flushers store it under `take_lock`, so `flush_target` only grows too.
        let ticket = {
            let mut last = self.take_lock.lock();
            for cpu in percpu::possible_cpus() {
                let Some(st) = self.state(cpu) else { continue };
                let taken = st.pending.del_all();
                // SAFETY: We hold `take_lock`, which owns `drained`.
                unsafe { (*st.drained.get()).append(taken) };
                st.flush_target.store(st.started.load(Relaxed), Relaxed);
            }
            *last = last.wrapping_add(1);
            *last
        };

        // Step 3: free what we took, unless a flusher that moved it after our step 2 did.
        {
            let mut freed = self.free_lock.lock();
            if (freed.wrapping_sub(ticket) as isize) < 0 {
                let mut any = false;
                let cover = {
                    let last = self.take_lock.lock();
                    for cpu in percpu::possible_cpus() {
                        let Some(st) = self.state(cpu) else { continue };
                        // SAFETY: We hold `take_lock`, which owns `drained`.
                        let drained = core::mem::take(unsafe { &mut *st.drained.get() });
                        any |= !drained.is_empty();
                        // SAFETY: We hold `free_lock`, which owns `freeing`.
                        unsafe { (*st.freeing.get()).append(drained) };
                    }
                    *last
                };
                // The moved objects were unlinked before they were taken, so one grace period
                // that starts now covers them all.
                if any {
                    rcu_tasks_trace::synchronize_rcu_tasks_trace();
                    for cpu in percpu::possible_cpus() {
                        let Some(st) = self.state(cpu) else { continue };
                        // SAFETY: We hold `free_lock`, which owns `freeing`.
                        let freeing = unsafe { &mut *st.freeing.get() };
                        if freeing.is_empty() {
                            continue;
                        }
                        while !freeing.is_empty() {
                            {
                                let _pin = MigrateDisabled::new();
                                st.free_chunk(freeing, true);
                            }
                            might_sleep();
                        }
                        st.stats.batches.fetch_add(1, Relaxed);
                    }
                }
                // Every ticket up to `cover` was drawn before the move: its items are freed.
                *freed = cover;
            }
        }

        // Step 4: wait for the batches the owners had taken. The barrier waits for the
        // callbacks queued before it; one that re-arms queues a new callback the barrier does
        // not wait for, and one that handed a large batch to the free work completes it later,
        // hence the loop on the counters rather than a single barrier. Acquire pairs with the
        // release increment after the frees.
        let start = Instant::<Monotonic>::now();
        let mut report = FLUSH_STALL_MS;
        for cpu in percpu::possible_cpus() {
            let Some(st) = self.state(cpu) else { continue };
            let target = st.flush_target.load(Relaxed);
            let done = || (st.completed.load(Acquire).wrapping_sub(target) as isize) >= 0;
            while !done() {
                rcu_tasks_trace::rcu_barrier_tasks_trace();
                if done() {
                    break;
                }
                let waited = start.elapsed();
                if waited.as_millis() >= report {
                    pr_warn!(
                        "flush waited {} ms for CPU {}: batches completed {}, needs {}\n",
                        waited.as_millis(),
                        cpu.as_u32(),
                        st.completed.load(Relaxed),
                        target
                    );
                    report = report.saturating_mul(2);
                }
                if limit.is_some_and(|l| waited.as_nanos() >= l.as_nanos()) {
                    return false;
                }
                // The free work is still freeing the batch, or an owner is between its take
                // and call_rcu_tasks_trace() (a hotplug kick can be preempted there): the
                // barrier had nothing to wait for.
                fsleep(Delta::from_millis(1));
            }
        }
        true
    }

    /// Returns a snapshot of the counters of `cpu`, or [`None`] if it is not possible.
    pub fn stats(&self, cpu: CpuId) -> Option<CpuStats> {
        self.state(cpu).map(CpuState::snapshot)
    }

    /// Returns the sum of the counters of every possible CPU (`max_pending`: the largest).
    pub fn total_stats(&self) -> CpuStats {
        let mut total = CpuStats::default();
        for cpu in percpu::possible_cpus() {
            if let Some(s) = self.stats(cpu) {
                total.accumulate(&s);
            }
        }
        total
    }

    /// Adds `obj` to the pending list of `cpu` without notifying anyone, like a producer on
    /// `cpu` while it is not online.
    ///
    /// # Safety
    ///
    /// As for [`Engine::queue`].
    #[cfg(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)]
    unsafe fn queue_offline(&self, cpu: CpuId, obj: NonNull<T>) -> bool {
        let Some(st) = self.state(cpu) else {
            return false;
        };
        st.stats.queued.fetch_add(1, Relaxed);
        // SAFETY: The caller passes ownership of a valid object whose node is free.
        unsafe { st.pending.add(obj) };
        true
    }
}

#[pinned_drop]
impl<T: DeferFree> PinnedDrop for Engine<T> {
    fn drop(self: Pin<&mut Self>) {
        // Nobody can queue any more: we are being dropped. Free what is left.
        self.flush();
        // A callback, or the free work, may still be giving its token back after its
        // `completed` increment. The callback was queued before this barrier, which waits
        // until it has returned; the free work is waited for right after. Neither starts
        // another grace period: nothing is pending any more. No handler can run: only
        // producers queue them, and `flush()` synced those queued before.
        rcu_tasks_trace::rcu_barrier_tasks_trace();
        for cpu in percpu::possible_cpus() {
            if let Some(st) = self.state(cpu) {
                st.sync_free_work();
                warn_on!(!st.pending.is_empty() || st.in_flight.load(Acquire) != 0);
            }
        }
        // INVARIANT: No handler, callback or free work can touch `pcpu` any more; it is
        // dropped next.
    }
}

// ---------------------------------------------------------------------------------------------
// BPF local storage glue.
// ---------------------------------------------------------------------------------------------

/// A `struct bpf_local_storage_elem` queued by `bpf_selem_free()`.
#[repr(transparent)]
struct Selem(Opaque<bindings::bpf_local_storage_elem>);

// SAFETY: An element may be freed on any CPU: `bpf_obj_free_fields()` and `kfree()` are not tied
// to the CPU or task that allocated it.
unsafe impl Send for Selem {}

// SAFETY: `Selem` is `repr(transparent)` over the C element. `llnode` is a member of the anonymous
// union that also holds `rcu` and `free_node`; once the element is handed to
// `bpf_selem_free_deferred()` none of them is used by anybody else.
impl_has_llist_node_c! {
    unsafe impl HasLListNode for Selem as bindings::bpf_local_storage_elem {
        self.__bindgen_anon_1.llnode
    }
}

/// The type of an `atomic_long_t`'s `counter`.
#[cfg(CONFIG_64BIT)]
type AtomicLongCounter = i64;
/// The type of an `atomic_long_t`'s `counter`.
#[cfg(not(CONFIG_64BIT))]
type AtomicLongCounter = i32;

/// Whether [`Selem::free`] has warned about a map's count below zero.
static MAP_COUNT_WARNED: Atomic<bool> = Atomic::new(false);

/// The count of `smap`'s elements that the engine holds (`smap->deferred`).
///
/// # Safety
///
/// `smap` must point to a live map, and the map must outlive `'a`.
unsafe fn map_deferred<'a>(
    smap: *mut bindings::bpf_local_storage_map,
) -> &'a Atomic<AtomicLongCounter> {
    // SAFETY: `deferred` is an `atomic_long_t`, whose `counter` is only accessed atomically; the
    // caller guarantees that the map outlives `'a`.
    unsafe { Atomic::from_ptr(&raw mut (*smap).deferred.counter) }
}

impl DeferFree for Selem {
    /// Same as the C `bpf_selem_free_trace_rcu()`, then the map's count of held elements drops.
    unsafe fn free(obj: NonNull<Self>) {
        let selem = obj.as_ptr().cast::<bindings::bpf_local_storage_elem>();
        // SAFETY: `selem` is valid and ours. No one writes `smap` of an unlinked element; READ_ONCE
        // as the C does with rcu_dereference_check().
        let smap: *mut bindings::bpf_local_storage_map =
            unsafe { kernel::sync::atomic::atomic_load(&raw mut (*selem).sdata.smap, Relaxed) };
        if !smap.is_null() {
            // SAFETY: The map and its record outlive the elements queued for it:
            // bpf_local_storage_map_free() waits until its `deferred` count, which counts this
            // element until the decrement below, is 0. The grace period has elapsed, so no
            // program can kptr_xchg() into the value any more.
            unsafe {
                bindings::bpf_obj_free_fields(
                    (*smap).map.record,
                    (&raw mut (*selem).sdata.data).cast(),
                )
            };
        }
        // SAFETY: Allocated by bpf_map_kmalloc_nolock(), which kfree() accepts. A Tasks Trace
        // grace period implies a regular RCU grace period.
        unsafe { bindings::kfree(selem.cast_const().cast()) };
        if !smap.is_null() {
            // SAFETY: `smap` is alive: its `deferred` still counts this element.
            let deferred = unsafe { map_deferred(smap) };
            // Fully ordered: the reads of the map above come before map free sees the count
            // drop (see "Map free" in the module documentation). Nothing touches the map after.
            let before = deferred.fetch_sub(1, Full);
            // More frees than queueings of this map: its count is broken, and its free waits
            // for ever (rather than free the map under elements it no longer counts). Once:
            // every later free of such a map would warn again, and a console flooded with
            // warnings stalls the machine rather than report the bug.
            warn_on!(before <= 0 && !MAP_COUNT_WARNED.xchg(true, Relaxed));
            if before == 1 {
                // SAFETY: wake_up_var() only hashes the address, which may be freed by now.
                unsafe { bindings::wake_up_var((&raw const *deferred).cast_mut().cast()) };
            }
        }
    }
}

/// A `struct bpf_local_storage` freed with its last element.
#[repr(transparent)]
struct Storage(Opaque<bindings::bpf_local_storage>);

// SAFETY: A storage may be freed on any CPU.
unsafe impl Send for Storage {}

// SAFETY: `Storage` is `repr(transparent)` over the C storage. `llnode` shares an anonymous union
// with `rcu` only; once the storage is handed to `bpf_local_storage_free_deferred()` neither is used
// by anybody else.
impl_has_llist_node_c! {
    unsafe impl HasLListNode for Storage as bindings::bpf_local_storage {
        self.__bindgen_anon_1.llnode
    }
}

impl DeferFree for Storage {
    /// Same as the C `bpf_local_storage_free_trace_rcu()`.
    unsafe fn free(obj: NonNull<Self>) {
        // SAFETY: Allocated by bpf_map_kmalloc_nolock(), which kfree() accepts; it is ours and
        // its grace period has elapsed.
        unsafe { bindings::kfree(obj.as_ptr().cast_const().cast()) };
    }
}

/// Elements, and storages: two engines, so that each `DeferFree` is a plain type and the list
/// nodes need no tag. A storage freed with its last element rides a grace period of its own,
/// concurrent with the element's.
static SELEMS: SetOnce<Pin<KBox<Engine<Selem>>>> = SetOnce::new();
static STORAGES: SetOnce<Pin<KBox<Engine<Storage>>>> = SetOnce::new();

/// The `stats` debugfs file.
///
/// Format: a header line, then one line per engine (`selem`, `storage`) and possible CPU, then
/// one `total` line per engine, fields separated by one space:
///
/// ```text
/// engine cpu queued batches gps freed flushed max_pending offloads max_step max_step_ns
/// selem 0 120 7 6 118 2 40 1 64 81200
/// selem total 120 7 6 118 2 40 1 64 81200
/// storage 0 3 1 1 3 0 1 0 1 2300
/// storage total 3 1 1 3 0 1 0 1 2300
/// ```
///
/// `queued`: objects queued; `batches`: batches freed; `gps`: Tasks Trace grace periods started
/// by the chain; `freed`: objects freed (by the chain or a flush); `flushed`: objects freed by
/// a flush; `max_pending`: largest number of queued, not yet freed objects a producer saw
/// (approximate); `offloads`: batches whose frees continued in the free work; `max_step` and
/// `max_step_ns`: most objects freed, and longest time spent freeing, in one step without a
/// chance to reschedule. Counters are per CPU of the producer and wrap; on a `total` line the
/// `max_*` fields are the largest of the CPUs'. `queued - freed` is the number of objects still
/// waiting.
struct StatsFile;

fn write_engine<T: DeferFree>(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    engine: Option<&Pin<KBox<Engine<T>>>>,
) -> fmt::Result {
    let Some(engine) = engine else {
        return Ok(());
    };
    let line = |f: &mut fmt::Formatter<'_>, cpu: &dyn fmt::Display, s: &CpuStats| {
        writeln!(
            f,
            "{name} {cpu} {} {} {} {} {} {} {} {} {}",
            s.queued,
            s.batches,
            s.gps,
            s.freed,
            s.flushed,
            s.max_pending,
            s.offloads,
            s.max_step,
            s.max_step_ns
        )
    };
    for cpu in percpu::possible_cpus() {
        if let Some(s) = engine.stats(cpu) {
            line(f, &cpu.as_u32(), &s)?;
        }
    }
    line(f, &"total", &engine.total_stats())
}

impl fmt::Debug for StatsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "engine cpu queued batches gps freed flushed max_pending offloads max_step \
             max_step_ns\n",
        )?;
        write_engine(f, "selem", SELEMS.as_ref())?;
        write_engine(f, "storage", STORAGES.as_ref())
    }
}

/// CPU hotplug "dead" callback: runs on a control CPU once `cpu` is gone.
///
/// # Safety
///
/// Called by the CPU hotplug core only.
unsafe extern "C" fn cpu_dead(cpu: c_uint) -> c_int {
    kick_all(cpu);
    0
}

/// CPU hotplug "online" callback: runs on `cpu` once it is up.
///
/// # Safety
///
/// Called by the CPU hotplug core only.
unsafe extern "C" fn cpu_online(cpu: c_uint) -> c_int {
    kick_all(cpu);
    0
}

fn kick_all(cpu: c_uint) {
    let Some(cpu) = CpuId::from_u32(cpu) else {
        return;
    };
    if let Some(engine) = SELEMS.as_ref() {
        engine.kick_cpu(cpu);
    }
    if let Some(engine) = STORAGES.as_ref() {
        engine.kick_cpu(cpu);
    }
}

fn init() -> Result {
    let selems = KBox::pin_init(Engine::<Selem>::new(), GFP_KERNEL)?;
    let storages = KBox::pin_init(Engine::<Storage>::new(), GFP_KERNEL)?;
    if !SELEMS.populate(selems) || !STORAGES.populate(storages) {
        return Err(EBUSY);
    }

    // SAFETY: The name is a static C string and the callbacks have the expected signature.
    let ret = unsafe {
        bindings::__cpuhp_setup_state(
            bindings::cpuhp_state_CPUHP_BP_PREPARE_DYN,
            c"bpf/local_storage_defer:dead".as_char_ptr(),
            false,
            None,
            Some(cpu_dead),
            false,
        )
    };
    if ret < 0 {
        pr_warn!("no CPU dead callback: {ret}\n");
    }
    // SAFETY: As above.
    let ret = unsafe {
        bindings::__cpuhp_setup_state(
            bindings::cpuhp_state_CPUHP_AP_ONLINE_DYN,
            c"bpf/local_storage_defer:online".as_char_ptr(),
            false,
            Some(cpu_online),
            None,
            false,
        )
    };
    if ret < 0 {
        pr_warn!("no CPU online callback: {ret}\n");
    }

    let dir = Dir::new(c"bpf_local_storage_defer");
    match KBox::pin_init(dir.read_only_file(c"stats", StatsFile), GFP_KERNEL) {
        // The file lives as long as the kernel: the engines are built in and never go away.
        Ok(file) => core::mem::forget(file),
        Err(e) => pr_warn!("no debugfs stats: {e:?}\n"),
    }
    Ok(())
}

/// Creates the engines; called once from an initcall, before any map exists.
///
/// # Safety
///
/// Called from C; no requirement beyond being called once, from a context that may sleep.
#[export]
pub unsafe extern "C" fn bpf_local_storage_defer_init() -> c_int {
    match init() {
        Ok(()) => 0,
        Err(e) => {
            pr_err!("init failed: {e:?}\n");
            e.to_errno()
        }
    }
}

/// Returns `true` once the engines accept objects.
///
/// # Safety
///
/// Called from C; no requirement. It is `unsafe` because `#[export]` requires it.
#[export]
pub unsafe extern "C" fn bpf_local_storage_defer_ready() -> bool {
    SELEMS.as_ref().is_some() && STORAGES.as_ref().is_some()
}

/// Queues an unlinked element to be freed after a Tasks Trace RCU grace period.
///
/// Returns `false`, doing nothing, if the engine is not ready.
///
/// # Safety
///
/// `selem` must be an element allocated by `bpf_selem_alloc()`, unlinked from its storage and
/// its map, that nobody else frees; ownership passes to the engine. If its `smap` is set, the
/// caller must hold a reference to that map.
#[export]
pub unsafe extern "C" fn bpf_selem_free_deferred(
    selem: *mut bindings::bpf_local_storage_elem,
) -> bool {
    let (Some(engine), Some(nn)) = (SELEMS.as_ref(), NonNull::new(selem.cast::<Selem>())) else {
        return false;
    };
    // SAFETY: `selem` is valid; no one writes `smap` of an unlinked element (READ_ONCE).
    let smap: *mut bindings::bpf_local_storage_map =
        unsafe { kernel::sync::atomic::atomic_load(&raw mut (*selem).sdata.smap, Relaxed) };
    if !smap.is_null() {
        // SAFETY: The caller holds a reference to the map (see "Map free" in the module
        // documentation), so it is alive until at least the element's free.
        // Relaxed: the caller's reference drop orders it before map free's read. NMI-safe.
        unsafe { map_deferred(smap) }.add(1, Relaxed);
    }
    // SAFETY: The caller passes ownership of an unlinked element; its union (`rcu`, `free_node`,
    // `llnode`) is no longer used by the C code. Readers that may hold it entered their
    // critical sections before the unlink, hence before this call.
    unsafe { engine.queue(nn) };
    true
}

/// Queues a storage freed with its last element.
///
/// Returns `false`, doing nothing, if the engine is not ready.
///
/// # Safety
///
/// `local_storage` must be a storage allocated by `bpf_local_storage_alloc()` that its owner no
/// longer points to and nobody else frees; ownership passes to the engine.
#[export]
pub unsafe extern "C" fn bpf_local_storage_free_deferred(
    local_storage: *mut bindings::bpf_local_storage,
) -> bool {
    let (Some(engine), Some(storage)) = (
        STORAGES.as_ref(),
        NonNull::new(local_storage.cast::<Storage>()),
    ) else {
        return false;
    };
    // SAFETY: The caller passes ownership of a storage nobody can newly find.
    unsafe { engine.queue(storage) };
    true
}

// ---------------------------------------------------------------------------------------------
// KUnit tests.
// ---------------------------------------------------------------------------------------------

/// Each test drives a private [`Engine`] with [`tests::TestObj`]s that count their frees and are
/// poisoned when freed, so that a lost, double or early free shows up as a count, not a crash.
/// Assertions run after the engine and the producers are torn down: a failed KUnit assertion
/// ends the test thread without running destructors.
#[cfg(CONFIG_BPF_LOCAL_STORAGE_DEFER_KUNIT_TEST)]
#[kunit_tests(bpf_local_storage_defer)]
mod tests {
    use super::*;
    use core::mem::ManuallyDrop;
    use kernel::{
        impl_has_hr_timer,
        impl_has_llist_node,
        llist::LListNode,
        processor::cpu_relax,
        sync::{
            rcu,
            Arc,
            ArcBorrow, //
        },
        time::{
            hrtimer::{
                HrTimer,
                HrTimerCallback,
                HrTimerCallbackContext,
                HrTimerPointer,
                HrTimerRestart,
                RelativePinnedHardMode, //
            },
            Instant,
            Monotonic, //
        },
        workqueue, //
    };

    const ALIVE: u32 = 0x0a11_ce00;
    const POISON: u32 = 0xdead_beef;

    /// What the frees of a pool add up to.
    struct Counters {
        freed: Atomic<usize>,
        /// Frees of an object that was not alive: double frees.
        bad: Atomic<usize>,
        /// Frees from a context that could migrate to another CPU (preemptible, migration
        /// enabled): [`DeferFree::free`] promises more, for `this_cpu_ptr()` users.
        migratable: Atomic<usize>,
    }

    /// Whether the current context may be moved to another CPU.
    fn migratable() -> bool {
        // SAFETY: `preemptible()` only reads the preemption count and the interrupt state.
        let preemptible = unsafe { bindings::preemptible() };
        // SAFETY: `current` is a valid task while it runs; it reads its own field.
        preemptible && unsafe { (*kernel::task::Task::current_raw()).migration_disabled } == 0
    }

    struct TestObj {
        node: LListNode,
        state: Atomic<u32>,
        frees: Atomic<u32>,
        counters: *const Counters,
    }

    // SAFETY: `counters` points to the `Counters` of the pool that owns the object, which
    // outlives every use of the object; the other fields are atomics or owned by the engine.
    unsafe impl Send for TestObj {}

    // SAFETY: As above; shared access only reads `counters` and uses atomics.
    unsafe impl Sync for TestObj {}

    impl_has_llist_node! {
        impl HasLListNode for TestObj { self.node }
    }

    impl DeferFree for TestObj {
        unsafe fn free(obj: NonNull<Self>) {
            // SAFETY: The pool owning `obj` outlives the engine that frees it.
            let obj = unsafe { obj.as_ref() };
            // SAFETY: As above, for the pool's counters.
            let counters = unsafe { &*obj.counters };
            if obj.state.xchg(POISON, Relaxed) != ALIVE {
                counters.bad.fetch_add(1, Relaxed);
            }
            if migratable() {
                counters.migratable.fetch_add(1, Relaxed);
            }
            obj.frees.fetch_add(1, Relaxed);
            counters.freed.fetch_add(1, Release);
        }

        fn after_take() {
            if TAKE_HOOK.cmpxchg(TAKE_ARMED, TAKE_HELD, Full).is_err() {
                return;
            }
            // Stay between the take and the grace period until the flush returns, or for
            // `TAKE_HOLD_MS`: a flush that counted this batch cannot return before it.
            let start = Instant::<Monotonic>::now();
            while TAKE_HOOK.load(Acquire) != TAKE_FLUSHED
                && start.elapsed().as_millis() < TAKE_HOLD_MS
            {
                cpu_relax();
            }
        }
    }

    /// [`DeferFree::after_take`] of test objects: idle, or armed by
    /// [`flush_counts_a_batch_being_taken`] for the next take, or holding that take, or told
    /// by that test's flusher that its flush returned.
    static TAKE_HOOK: Atomic<u32> = Atomic::new(TAKE_IDLE);
    const TAKE_IDLE: u32 = 0;
    const TAKE_ARMED: u32 = 1;
    const TAKE_HELD: u32 = 2;
    const TAKE_FLUSHED: u32 = 3;
    /// How long the hook holds an owner right after its take, at most.
    const TAKE_HOLD_MS: i64 = 500;

    /// Test objects; they are only "freed" (poisoned and counted), so they stay readable.
    ///
    /// # Invariants
    ///
    /// `counters` is dropped only by [`Pool`]'s drop, and not at all once [`LEAKED`] is set.
    struct Pool {
        counters: ManuallyDrop<KBox<Counters>>,
        objs: KVVec<TestObj>,
        cursor: Atomic<usize>,
    }

    impl Pool {
        fn new(n: usize) -> Result<Pool> {
            let counters = KBox::new(
                Counters {
                    freed: Atomic::new(0),
                    bad: Atomic::new(0),
                    migratable: Atomic::new(0),
                },
                GFP_KERNEL,
            )?;
            let mut objs = KVVec::with_capacity(n, GFP_KERNEL)?;
            for _ in 0..n {
                objs.push(
                    TestObj {
                        node: LListNode::new(),
                        state: Atomic::new(ALIVE),
                        frees: Atomic::new(0),
                        counters: &raw const *counters,
                    },
                    GFP_KERNEL,
                )?;
            }
            Ok(Pool {
                counters: ManuallyDrop::new(counters),
                objs,
                cursor: Atomic::new(0),
            })
        }

        fn obj(&self, i: usize) -> Option<NonNull<TestObj>> {
            self.objs.get(i).map(NonNull::from)
        }

        /// Hands out the next unused object, from any context.
        fn claim(&self) -> Option<NonNull<TestObj>> {
            self.obj(self.cursor.fetch_add(1, Relaxed))
        }

        fn freed(&self) -> usize {
            self.counters.freed.load(Acquire)
        }

        fn bad(&self) -> usize {
            self.counters.bad.load(Relaxed)
        }

        /// Objects freed from a context that could migrate (see [`Counters::migratable`]).
        fn migratable(&self) -> usize {
            self.counters.migratable.load(Relaxed)
        }

        /// Whether every object in `range` was freed exactly once and is poisoned.
        fn freed_once(&self, range: core::ops::Range<usize>) -> bool {
            self.objs.get(range).is_some_and(|objs| {
                objs.iter()
                    .all(|o| o.frees.load(Relaxed) == 1 && o.state.load(Relaxed) == POISON)
            })
        }

        /// How many objects in `range` were not freed exactly once.
        fn not_freed_once(&self, range: core::ops::Range<usize>) -> usize {
            self.objs.get(range).map_or(usize::MAX, |objs| {
                objs.iter()
                    .filter(|o| o.frees.load(Relaxed) != 1 || o.state.load(Relaxed) != POISON)
                    .count()
            })
        }

        /// Whether no object in `range` was freed.
        #[cfg(CONFIG_HOTPLUG_CPU)]
        fn none_freed(&self, range: core::ops::Range<usize>) -> bool {
            self.objs.get(range).is_some_and(|objs| {
                objs.iter()
                    .all(|o| o.frees.load(Relaxed) == 0 && o.state.load(Relaxed) == ALIVE)
            })
        }
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            if LEAKED.load(Relaxed) {
                // An engine that a test gave up on may still free these objects, and count
                // them.
                core::mem::forget(core::mem::take(&mut self.objs));
                return;
            }
            // SAFETY: Dropped once, here; nothing uses it afterwards (type invariant).
            unsafe { ManuallyDrop::drop(&mut self.counters) };
        }
    }

    /// How long a test's flush may wait for the engine's batches before the test fails.
    const FLUSH_LIMIT_MS: i64 = 30_000;

    /// Set once a test gave up on an engine that did not free what it was given: that engine,
    /// and every pool from then on, is leaked, since a late free would write into them.
    static LEAKED: Atomic<bool> = Atomic::new(false);

    /// Flushes `engine`, giving up after [`FLUSH_LIMIT_MS`] (see [`Engine::flush_within`]):
    /// a flush that never returns fails its test with a message instead of hanging the run.
    /// The caller must not drop `engine` if this returns `false`.
    fn flush_bounded(engine: &Engine<TestObj>) -> bool {
        if engine.flush_within(Some(Delta::from_millis(FLUSH_LIMIT_MS))) {
            return true;
        }
        pr_err!(
            "flush() still waits after {FLUSH_LIMIT_MS} ms for batches taken before it; \
             leaking the engine\n"
        );
        LEAKED.store(true, Relaxed);
        false
    }

    /// Flushes and drops `engine`, or leaks it if the flush gave up (see [`flush_bounded`]).
    fn close(engine: Pin<KBox<Engine<TestObj>>>) -> bool {
        if flush_bounded(&engine) {
            drop(engine);
            true
        } else {
            core::mem::forget(engine);
            false
        }
    }

    /// [`close`] after a flush that returned, or else leaks `engine`.
    fn close_after(returned: bool, engine: Pin<KBox<Engine<TestObj>>>) -> bool {
        if returned {
            close(engine)
        } else {
            core::mem::forget(engine);
            false
        }
    }

    fn new_engine() -> Result<Pin<KBox<Engine<TestObj>>>> {
        KBox::pin_init(Engine::<TestObj>::new(), GFP_KERNEL)
    }

    /// Queues `obj` on the current CPU.
    fn queue(engine: &Engine<TestObj>, obj: NonNull<TestObj>) {
        // SAFETY: Test objects are handed out once each (by index or by `Pool::claim`), their
        // pool outlives the engine, and no reader finds them after this point.
        unsafe { engine.queue(obj) };
    }

    /// Polls `cond` every 10 ms for up to `ms` milliseconds.
    fn wait_until(mut cond: impl FnMut() -> bool, ms: u32) -> bool {
        let mut waited = 0;
        while !cond() {
            if waited >= ms {
                return false;
            }
            fsleep(Delta::from_millis(10));
            waited += 10;
        }
        true
    }

    /// Marks the current test as skipped, with `reason` as its status comment.
    fn skip(reason: &CStr) {
        // SAFETY: FFI call without preconditions.
        let test = unsafe { bindings::kunit_get_current_test() };
        if test.is_null() {
            return;
        }
        // SAFETY: `test` is the running test, which this thread owns.
        unsafe {
            (*test).status = bindings::kunit_status_KUNIT_SKIPPED;
            let dst = &mut (*test).status_comment;
            let src = reason.to_bytes();
            let n = src.len().min(dst.len() - 1);
            for (d, s) in dst.iter_mut().zip(&src[..n]) {
                *d = *s as c_char;
            }
            dst[n] = 0;
        }
    }

    // --- a. Producers in every context at once -------------------------------------------------

    /// Shared by the stress producers, in an `Arc` so that workers, threads and timers can hold
    /// it.
    struct Stress {
        pool: Pool,
        engine: Pin<KBox<Engine<TestObj>>>,
        task: Atomic<usize>,
        /// Task context with bottom halves disabled.
        bh_off: Atomic<usize>,
        /// Softirq context: work items of the BH workqueue.
        softirq: Atomic<usize>,
        /// Work items on the BH workqueue that have not finished yet.
        bh_in_flight: Atomic<usize>,
        hardirq: Atomic<usize>,
        nmi: Atomic<usize>,
        /// NMIs sent and not yet taken by the handler.
        nmi_armed: Atomic<usize>,
        worker_done: Atomic<bool>,
        /// Per CPU: set while the CPU's producer thread is inside [`Engine::queue`].
        in_queue: KVec<Atomic<bool>>,
        /// Objects queued by interrupts and NMIs that interrupted a producer thread inside
        /// [`Engine::queue`] on the same CPU.
        nested: Atomic<usize>,
        /// Tells the producer threads and their timers to stop.
        stop: Atomic<bool>,
        /// Asynchronous IPIs sent by producer threads whose callback has not finished yet.
        ipis_in_flight: Atomic<usize>,
        /// Set if some of those never finished: the `Stress` is then leaked, never freed.
        ipis_stuck: Atomic<bool>,
    }

    impl Stress {
        /// A pool of `n` objects and an engine; nothing produced yet.
        fn new(n: usize) -> Result<Arc<Self>> {
            let cpus = kernel::cpu::nr_cpu_ids() as usize;
            let mut in_queue = KVec::with_capacity(cpus, GFP_KERNEL)?;
            for _ in 0..cpus {
                in_queue.push(Atomic::new(false), GFP_KERNEL)?;
            }
            Ok(Arc::new(
                Stress {
                    pool: Pool::new(n)?,
                    engine: new_engine()?,
                    task: Atomic::new(0),
                    bh_off: Atomic::new(0),
                    softirq: Atomic::new(0),
                    bh_in_flight: Atomic::new(0),
                    hardirq: Atomic::new(0),
                    nmi: Atomic::new(0),
                    nmi_armed: Atomic::new(0),
                    worker_done: Atomic::new(false),
                    in_queue,
                    nested: Atomic::new(0),
                    stop: Atomic::new(false),
                    ipis_in_flight: Atomic::new(0),
                    ipis_stuck: Atomic::new(false),
                },
                GFP_KERNEL,
            )?)
        }

        /// Queues up to `n` objects, counting them in `ctr`; returns how many.
        fn produce(&self, n: usize, ctr: &Atomic<usize>) -> usize {
            for k in 0..n {
                let Some(obj) = self.pool.claim() else {
                    return k;
                };
                ctr.fetch_add(1, Relaxed);
                queue(&self.engine, obj);
            }
            n
        }

        /// [`Stress::produce`] from a hard interrupt or an NMI; also counts, in `nested`, what
        /// it queued while the interrupted producer thread of this CPU was inside
        /// [`Engine::queue`]. No panic, no overflow: counters wrap.
        fn produce_irq(&self, n: usize, ctr: &Atomic<usize>) -> usize {
            let k = self.produce(n, ctr);
            // The thread cannot change its flag while we interrupt it.
            let cpu = CpuId::current().as_u32() as usize;
            if self.in_queue.get(cpu).is_some_and(|f| f.load(Relaxed)) {
                self.nested.fetch_add(k, Relaxed);
            }
            k
        }

        /// Queues one object from a producer thread whose CPU's flag is `in_queue`, raising the
        /// flag around [`Engine::queue`]. Returns `false` once the pool is used up.
        fn produce_flagged(&self, in_queue: &Atomic<bool>) -> bool {
            let Some(obj) = self.pool.claim() else {
                return false;
            };
            self.task.fetch_add(1, Relaxed);
            // Read only by interrupts and NMIs on this CPU, which see program order; the
            // compiler does not move an atomic store across the FFI calls in `queue()`.
            in_queue.store(true, Relaxed);
            queue(&self.engine, obj);
            in_queue.store(false, Relaxed);
            true
        }

        /// Interrupts `peer`, most likely in the middle of its producer thread's
        /// [`Engine::queue`]: an NMI that queues there if `use_nmi` and the test has NMIs (see
        /// [`nmi::send_to`]), otherwise an asynchronous IPI that does. Sent by the producer
        /// threads themselves, CPU to CPU, so that the rate does not depend on timers, which an
        /// emulator under load fires late.
        fn kick(self: &Arc<Self>, peer: CpuId, use_nmi: bool) {
            if use_nmi && nmi::send_to(self, peer) {
                return;
            }
            let Ok(cpu) = c_int::try_from(peer.as_u32()) else {
                return;
            };
            self.ipis_in_flight.fetch_add(1, Relaxed);
            // SAFETY: `ipi_nest` has the signature of an IPI callback; the `Stress` lives until
            // `ipis_in_flight` is back to zero, which the callback does last.
            let ret = unsafe {
                bindings::smp_call_function_single(
                    cpu,
                    Some(ipi_nest),
                    Arc::as_ptr(self).cast_mut().cast(),
                    false,
                )
            };
            if ret != 0 {
                self.ipis_in_flight.fetch_sub(1, Relaxed);
            }
        }

        /// From an NMI handler: produces if an NMI was sent and not taken yet, and takes it.
        fn produce_nmi(&self) {
            let mut armed = self.nmi_armed.load(Relaxed);
            while armed > 0 {
                match self.nmi_armed.cmpxchg(armed, armed - 1, Relaxed) {
                    Ok(_) => {
                        self.produce_irq(8, &self.nmi);
                        return;
                    }
                    Err(now) => armed = now,
                }
            }
        }

        /// Task context, then a bottom-halves-disabled section.
        fn produce_task_and_bh(&self, n: usize) -> usize {
            let a = self.produce(n, &self.task);
            // SAFETY: Task context; enabled again right below.
            unsafe { bindings::local_bh_disable() };
            let b = self.produce(n, &self.bh_off);
            // SAFETY: Pairs with the `local_bh_disable()` above.
            unsafe { bindings::local_bh_enable() };
            a + b
        }
    }

    /// A work item of the BH workqueue, so run in softirq context, that produces into a
    /// [`Stress`]. Its own type, so its own lockdep class: `Queue::try_spawn`'s work items
    /// share one, and one run from a softirq and one from a task look like a lock taken with
    /// and without bottom halves disabled.
    #[pin_data]
    struct BhProducer {
        #[pin]
        work: workqueue::Work<BhProducer>,
        /// Not a reference: dropping the last one in a softirq would drop the engine there.
        stress: *const Stress,
    }

    // SAFETY: `Stress` is `Sync`, and the spawner keeps it alive while the work item may run.
    unsafe impl Send for BhProducer {}

    impl_has_work! {
        impl HasWork<Self> for BhProducer { self.work }
    }

    impl workqueue::WorkItem for BhProducer {
        type Pointer = Pin<KBox<BhProducer>>;

        fn run(this: Pin<KBox<BhProducer>>) {
            // SAFETY: The test keeps the `Stress` alive until `bh_in_flight` is back to zero,
            // which this work item does last.
            let s = unsafe { &*this.stress };
            s.produce(16, &s.softirq);
            s.bh_in_flight.fetch_sub(1, Release);
        }
    }

    impl BhProducer {
        /// Queues one on the BH workqueue; the caller counted it in `bh_in_flight`.
        fn spawn(stress: &Arc<Stress>) -> Result {
            let w = KBox::pin_init(
                pin_init!(BhProducer {
                    work <- workqueue::new_work!("BhProducer"),
                    stress: Arc::as_ptr(stress),
                }),
                GFP_KERNEL,
            )?;
            workqueue::system_bh().enqueue(w);
            Ok(())
        }
    }

    /// IPI callback: hard interrupt context on every online CPU.
    ///
    /// # Safety
    ///
    /// `info` must point to a live [`Stress`].
    unsafe extern "C" fn ipi_produce(info: *mut c_void) {
        // SAFETY: `info` is the `Stress` the caller keeps alive until every IPI has run (wait).
        let s = unsafe { &*info.cast::<Stress>() };
        s.produce_irq(16, &s.hardirq);
    }

    /// Asynchronous IPI callback of [`Stress::kick`]: hard interrupt context on the peer CPU.
    ///
    /// # Safety
    ///
    /// `info` must point to a [`Stress`] that lives until its `ipis_in_flight` is zero, and the
    /// sender must have counted this call in it.
    unsafe extern "C" fn ipi_nest(info: *mut c_void) {
        // SAFETY: The `Stress` lives until we uncount ourselves, which we do last.
        let s = unsafe { &*info.cast::<Stress>() };
        s.produce_irq(2, &s.hardirq);
        s.ipis_in_flight.fetch_sub(1, Release);
    }

    /// How many CPUs are online now.
    fn online_cpus() -> usize {
        percpu::possible_cpus()
            .filter(|&cpu| percpu::cpu_online(cpu))
            .count()
    }

    /// The NMIs of one stress test: a registered source, or why there is none here. Tests
    /// without NMIs still check everything else, then report themselves skipped with the
    /// reason: never a silent pass.
    enum Nmis {
        On(nmi::Registration),
        #[cfg_attr(
            CONFIG_X86_LOCAL_APIC,
            expect(dead_code, reason = "the local APIC always sends NMIs")
        )]
        Off(&'static CStr),
    }

    impl Nmis {
        /// Sends an NMI to every online CPU, if there is a source.
        fn send_all(&self, s: &Stress) -> Result {
            match self {
                Nmis::On(reg) => reg.send_all(s),
                Nmis::Off(_) => Ok(()),
            }
        }

        /// Why this test has no NMIs, if it has none.
        fn off(&self) -> Option<&'static CStr> {
            match self {
                Nmis::On(_) => None,
                Nmis::Off(why) => Some(why),
            }
        }
    }

    /// NMIs through the local APIC.
    #[cfg(CONFIG_X86_LOCAL_APIC)]
    mod nmi {
        use super::*;

        /// `NMI_DONE` and `NMI_HANDLED` of `<asm/nmi.h>`.
        const NMI_DONE: c_int = 0;
        const NMI_HANDLED: c_int = 1;
        const NAME: &CStr = c"bpf_ls_defer_kunit";

        /// The `Stress` of the [`Registration`] alive, if any.
        static STRESS: Atomic<*mut Stress> = Atomic::new(core::ptr::null_mut());

        /// The `NMI_LOCAL` handler: produces if an NMI of ours is expected.
        ///
        /// While a test runs it claims every NMI: NMIs can merge, and one of ours that found
        /// its count already taken by another NMI must not be reported as unknown. The other
        /// `NMI_LOCAL` handlers (perf) still see every NMI.
        ///
        /// # Safety
        ///
        /// Called by the NMI core only.
        unsafe extern "C" fn handler(_type: c_uint, _regs: *mut bindings::pt_regs) -> c_int {
            let s = STRESS.load(Acquire);
            if s.is_null() {
                return NMI_DONE;
            }
            // SAFETY: `STRESS` is cleared, and the handler unregistered (which waits for
            // running handlers), before the `Registration` drops its reference to the `Stress`.
            unsafe { &*s }.produce_nmi();
            NMI_HANDLED
        }

        fn nmi_local() -> Result<c_uint> {
            c_uint::try_from(bindings::NMI_LOCAL).map_err(|_| EINVAL)
        }

        /// A registered `NMI_LOCAL` handler producing into `stress`; unregistered on drop.
        ///
        /// One at a time: the tests run one after the other.
        pub(super) struct Registration {
            _action: KBox<bindings::nmiaction>,
            stress: Arc<Stress>,
        }

        /// Registers the handler for `stress`.
        pub(super) fn start(stress: &Arc<Stress>) -> Result<Nmis> {
            Registration::new(stress).map(Nmis::On)
        }

        impl Registration {
            fn new(stress: &Arc<Stress>) -> Result<Self> {
                let mut action: KBox<bindings::nmiaction> =
                    KBox::new(pin_init::zeroed(), GFP_KERNEL)?;
                action.handler = Some(handler);
                action.name = NAME.as_char_ptr();
                // SAFETY: `action.list` is valid for writes.
                unsafe { bindings::INIT_LIST_HEAD(&raw mut action.list) };
                // SAFETY: `action` is initialised and stays allocated until unregistered.
                kernel::error::to_result(unsafe {
                    bindings::__register_nmi_handler(nmi_local()?, &raw mut *action)
                })?;
                let this = Self {
                    _action: action,
                    stress: stress.clone(),
                };
                STRESS.store(Arc::as_ptr(&this.stress).cast_mut(), Release);
                Ok(this)
            }
        }

        impl Drop for Registration {
            fn drop(&mut self) {
                STRESS.store(core::ptr::null_mut(), Release);
                if let Ok(t) = nmi_local() {
                    // SAFETY: Registered in `new()` under `NAME`; this waits for running
                    // handlers before `self._action` is freed and `self.stress` dropped.
                    unsafe { bindings::unregister_nmi_handler(t, NAME.as_char_ptr()) };
                }
            }
        }

        /// Sends an NMI to `cpu`; `false` if no handler is registered.
        pub(super) fn send_to(s: &Stress, cpu: CpuId) -> bool {
            let Ok(vector) = c_int::try_from(bindings::NMI_VECTOR) else {
                return false;
            };
            if STRESS.load(Relaxed).is_null() {
                return false;
            }
            s.nmi_armed.fetch_add(1, Relaxed);
            // SAFETY: `cpumask_of()` of a possible CPU is a valid cpumask; NMI_VECTOR with a
            // mask selects NMI delivery in every APIC driver.
            unsafe { bindings::__apic_send_IPI_mask(bindings::cpumask_of(cpu.as_u32()), vector) };
            true
        }

        impl Registration {
            /// Sends an NMI to every online CPU, this one included.
            ///
            /// `__apic_send_IPI_mask()` rather than `apic->send_IPI_self()`: in x2APIC mode
            /// the latter writes the SELF IPI register, which only delivers fixed vectors.
            pub(super) fn send_all(&self, s: &Stress) -> Result {
                let vector = c_int::try_from(bindings::NMI_VECTOR).map_err(|_| EINVAL)?;
                s.nmi_armed.fetch_add(online_cpus(), Relaxed);
                // SAFETY: The online mask is a valid cpumask; NMI_VECTOR with a mask selects NMI
                // delivery in every APIC driver.
                unsafe { bindings::__apic_send_IPI_mask(bindings::cpu_online_mask(), vector) };
                Ok(())
            }
        }
    }

    /// NMIs from PMU overflow pseudo-NMIs (`irqchip.gicv3_pseudo_nmi=1`): arm64 has no way to
    /// send one NMI to a CPU that a module can use (its NMI IPIs are the backtrace and stop
    /// IPIs), so a pinned cycle counter on every online CPU overflows every [`nmi::PERIOD`]
    /// cycles, and the overflow that finds an NMI sent and not taken produces, on whichever
    /// CPU it lands (as x86's handler takes whichever NMI comes).
    #[cfg(all(CONFIG_ARM64, CONFIG_ARM64_PSEUDO_NMI, CONFIG_HW_PERF_EVENTS))]
    mod nmi {
        use super::*;

        /// Cycles between two overflows of a CPU's counter: 0.5 ms under TCG, whose PMU
        /// counts virtual time at 1 GHz: 2,000 NMIs a second a CPU, under the sample rate
        /// limit perf lowers itself to while an emulated NMI takes up to 100 us (at 10,000
        /// a second it went below that, for the test module's counters too). The test
        /// module uses the same period.
        const PERIOD: u64 = 500_000;
        /// How long the first overflow may take to come.
        const PROBE_MS: u32 = 1_000;

        /// The `Stress` of the [`Registration`] alive, if any.
        static STRESS: Atomic<*mut Stress> = Atomic::new(core::ptr::null_mut());
        /// Overflows handled in NMI and outside NMI since the last [`start`].
        static IN_NMI: Atomic<usize> = Atomic::new(0);
        static NOT_NMI: Atomic<usize> = Atomic::new(0);

        /// The counters' overflow handler: produces if an NMI of ours is expected.
        ///
        /// # Safety
        ///
        /// Called by perf only, for a counter of a [`Registration`].
        unsafe extern "C" fn overflow(
            _event: *mut bindings::perf_event,
            _data: *mut bindings::perf_sample_data,
            _regs: *mut bindings::pt_regs,
        ) {
            // SAFETY: FFI call without preconditions.
            if !unsafe { bindings::in_nmi() } {
                // A plain interrupt: pseudo-NMIs are off; `start()` tells.
                NOT_NMI.fetch_add(1, Relaxed);
                return;
            }
            IN_NMI.fetch_add(1, Relaxed);
            let s = STRESS.load(Acquire);
            if s.is_null() {
                return;
            }
            // SAFETY: `STRESS` is cleared, and every counter released (which waits for a
            // handler running on the counter's CPU), before the `Registration` drops its
            // reference to the `Stress`.
            unsafe { &*s }.produce_nmi();
        }

        /// A pinned cycle counter on every online CPU producing into `stress`; released on
        /// drop.
        ///
        /// One at a time: the tests run one after the other.
        pub(super) struct Registration {
            events: KVec<NonNull<bindings::perf_event>>,
            stress: Arc<Stress>,
        }

        impl Drop for Registration {
            fn drop(&mut self) {
                STRESS.store(core::ptr::null_mut(), Release);
                for ev in self.events.drain_all() {
                    // SAFETY: Created in `start()` and released once, here. This removes the
                    // counter from its CPU with a call on that CPU, so an overflow handler
                    // running there has returned before `self.stress` is dropped.
                    unsafe { bindings::perf_event_release_kernel(ev.as_ptr()) };
                }
            }
        }

        /// Puts a counter on every online CPU and waits up to [`PROBE_MS`] for an overflow in
        /// NMI. `Nmis::Off` with the reason if there is no cycle counter, no overflow, or
        /// overflows outside NMI (pseudo-NMIs off).
        pub(super) fn start(stress: &Arc<Stress>) -> Result<Nmis> {
            let cpus = kernel::cpu::nr_cpu_ids() as usize;
            let mut reg = Registration {
                events: KVec::with_capacity(cpus, GFP_KERNEL)?,
                stress: stress.clone(),
            };
            IN_NMI.store(0, Relaxed);
            NOT_NMI.store(0, Relaxed);
            STRESS.store(Arc::as_ptr(&reg.stress).cast_mut(), Release);

            let mut attr: bindings::perf_event_attr = pin_init::zeroed();
            attr.type_ = bindings::perf_type_id_PERF_TYPE_HARDWARE;
            attr.size =
                u32::try_from(size_of::<bindings::perf_event_attr>()).map_err(|_| EINVAL)?;
            attr.config = bindings::perf_hw_id_PERF_COUNT_HW_CPU_CYCLES.into();
            attr.__bindgen_anon_1.sample_period = PERIOD;
            attr.set_pinned(1);
            for cpu in percpu::possible_cpus() {
                if !percpu::cpu_online(cpu) || reg.events.len() == cpus {
                    continue;
                }
                let c = c_int::try_from(cpu.as_u32()).map_err(|_| EINVAL)?;
                // SAFETY: `attr` is a valid attribute that perf copies; `overflow` has the
                // signature of an overflow handler and needs no context.
                let ev = unsafe {
                    bindings::perf_event_create_kernel_counter(
                        &mut attr,
                        c,
                        core::ptr::null_mut(),
                        Some(overflow),
                        core::ptr::null_mut(),
                    )
                };
                match kernel::error::from_err_ptr(ev).map(NonNull::new) {
                    Ok(Some(ev)) => {
                        // The capacity is `nr_cpu_ids`: this does not allocate.
                        reg.events.push(ev, GFP_NOWAIT)?;
                    }
                    Ok(None) => return Ok(Nmis::Off(c"perf returned no cycle counter")),
                    Err(e) if e == ENOMEM => return Err(e),
                    Err(_) => return Ok(Nmis::Off(c"no PMU cycle counter on an online CPU")),
                }
            }
            wait_until(
                || IN_NMI.load(Relaxed) > 0 || NOT_NMI.load(Relaxed) > 0,
                PROBE_MS,
            );
            if IN_NMI.load(Relaxed) > 0 {
                Ok(Nmis::On(reg))
            } else if NOT_NMI.load(Relaxed) > 0 {
                Ok(Nmis::Off(
                    c"the PMU overflow interrupt is not an NMI (irqchip.gicv3_pseudo_nmi=1?)",
                ))
            } else {
                Ok(Nmis::Off(
                    c"the PMU cycle counter did not overflow within 1 s",
                ))
            }
        }

        /// Arms one NMI: the next overflow, on any CPU, takes it. `false` if no counters are
        /// registered.
        pub(super) fn send_to(s: &Stress, _cpu: CpuId) -> bool {
            if STRESS.load(Relaxed).is_null() {
                return false;
            }
            s.nmi_armed.fetch_add(1, Relaxed);
            true
        }

        impl Registration {
            /// Arms one NMI per online CPU.
            pub(super) fn send_all(&self, s: &Stress) -> Result {
                s.nmi_armed.fetch_add(online_cpus(), Relaxed);
                Ok(())
            }
        }
    }

    /// No NMI source for the tests on other architectures.
    #[cfg(not(any(
        CONFIG_X86_LOCAL_APIC,
        all(CONFIG_ARM64, CONFIG_ARM64_PSEUDO_NMI, CONFIG_HW_PERF_EVENTS)
    )))]
    mod nmi {
        use super::*;

        /// Uninhabited: there is never one.
        pub(super) enum Registration {}

        pub(super) fn start(_stress: &Arc<Stress>) -> Result<Nmis> {
            Ok(Nmis::Off(
                c"no NMI source for the tests on this architecture",
            ))
        }

        pub(super) fn send_to(_s: &Stress, _cpu: CpuId) -> bool {
            false
        }

        impl Registration {
            pub(super) fn send_all(&self, _s: &Stress) -> Result {
                match *self {}
            }
        }
    }

    /// Guards: an engine that frees from the producer, or whose flush misses a handler half-way
    /// through a batch, or items no callback owns, leaves objects unfreed when `flush()` returns
    /// (`freed == produced` fails); a double free fails `bad == 0`. A plain (non-atomic) list
    /// (`BROKEN=1`) only occasionally: cross-CPU races and nesting are rare in this short burst;
    /// [`nested_producers_on_every_cpu`] is the test that catches it.
    #[test]
    fn producers_in_all_contexts() -> Result {
        const N: usize = 8192;
        let stress = Stress::new(N)?;
        let sptr = (&raw const *stress).cast_mut();

        let nmis = nmi::start(&stress)?;

        // A second task, on whichever CPU the unbound workqueue picks.
        let s2 = stress.clone();
        free_queue().try_spawn(GFP_KERNEL, move || {
            while s2.produce_task_and_bh(16) != 0 {
                fsleep(Delta::from_micros(200));
            }
            s2.worker_done.store(true, Release);
        })?;

        loop {
            let mut n = stress.produce_task_and_bh(16);
            // SAFETY: `stress` outlives the call, which waits for every CPU's callback.
            unsafe {
                bindings::on_each_cpu_cond_mask(
                    None,
                    Some(ipi_produce),
                    sptr.cast(),
                    true,
                    bindings::cpu_online_mask(),
                )
            };
            nmis.send_all(&stress)?;
            // Softirq context: a work item of the BH workqueue runs from a softirq.
            stress.bh_in_flight.fetch_add(1, Relaxed);
            if BhProducer::spawn(&stress).is_err() {
                stress.bh_in_flight.fetch_sub(1, Relaxed);
            }
            n += stress.produce_task_and_bh(16);
            if n == 0 && stress.pool.cursor.load(Relaxed) >= N {
                break;
            }
            fsleep(Delta::from_micros(200));
        }

        let worker_done = wait_until(|| stress.worker_done.load(Acquire), 30_000);
        let bh_done = wait_until(|| stress.bh_in_flight.load(Acquire) == 0, 30_000);
        if !bh_done {
            // Never free what a stuck work item may still use.
            core::mem::forget(stress.clone());
        }
        let no_nmi = nmis.off();
        if no_nmi.is_none() {
            // NMIs can merge; do not wait for ever for the last ones.
            wait_until(|| stress.nmi_armed.load(Relaxed) == 0, 2_000);
        }
        drop(nmis);

        let produced = stress.task.load(Relaxed)
            + stress.bh_off.load(Relaxed)
            + stress.softirq.load(Relaxed)
            + stress.hardirq.load(Relaxed)
            + stress.nmi.load(Relaxed);
        let returned = flush_bounded(&stress.engine);
        if !returned {
            core::mem::forget(stress.clone());
        }
        // Read right after flush() returned: nothing may still be on its way.
        let freed = stress.pool.freed();
        let total = stress.engine.total_stats();

        assert!(returned);
        assert!(worker_done);
        assert!(bh_done);
        assert_eq!(produced, N);
        assert_eq!(freed, produced);
        assert!(stress.pool.freed_once(0..N));
        assert_eq!(stress.pool.bad(), 0);
        assert_eq!(stress.pool.migratable(), 0);
        assert_eq!(total.queued, produced);
        assert_eq!(total.freed, produced);
        assert!(stress.task.load(Relaxed) > 0);
        assert!(stress.bh_off.load(Relaxed) > 0);
        assert!(stress.softirq.load(Relaxed) > 0);
        assert!(stress.hardirq.load(Relaxed) > 0);
        match no_nmi {
            None => assert!(stress.nmi.load(Relaxed) > 0),
            Some(why) => skip(why),
        }
        Ok(())
    }

    // --- a2. Producers nested on the same CPU, on every CPU -------------------------------------

    /// Objects of each round of [`nested_producers_on_every_cpu`] (24 bytes each).
    const NEST_OBJS: usize = 1 << 18;
    /// How long [`nested_producers_on_every_cpu`] produces: rounds start until it has elapsed.
    const NEST_BUDGET_MS: i64 = 1_000;
    /// ... and go on until some object was queued by a nested producer, for at most this long:
    /// with more vCPUs than host CPUs, a round may see no nesting at all.
    const NEST_MAX_MS: i64 = 15_000;
    /// Period of each CPU's hard hrtimer.
    const NEST_TIMER_US: i64 = 40;
    /// Each producer thread interrupts its peer CPU (IPI and NMI in turn) after this many objects.
    const NEST_KICK_EVERY: u32 = 4;

    /// The nested producers of one online CPU: a thread bound to it that queues in task context
    /// in a tight loop, and a pinned hard hrtimer that queues from hard interrupt context on
    /// top of it.
    #[pin_data]
    struct CpuLoad {
        #[pin]
        timer: HrTimer<CpuLoad>,
        stress: Arc<Stress>,
    }

    impl_has_hr_timer! {
        impl HasHrTimer<Self> for CpuLoad {
            mode: RelativePinnedHardMode<Monotonic>, field: self.timer
        }
    }

    impl HrTimerCallback for CpuLoad {
        type Pointer<'a> = Arc<Self>;

        /// Hard interrupt context (also on `PREEMPT_RT`), on the CPU of the thread it interrupts.
        fn run(
            this: ArcBorrow<'_, Self>,
            mut ctx: HrTimerCallbackContext<'_, Self>,
        ) -> HrTimerRestart {
            let s = &this.stress;
            if s.stop.load(Relaxed) {
                return HrTimerRestart::NoRestart;
            }
            s.produce_irq(2, &s.hardirq);
            ctx.forward_now(Delta::from_micros(NEST_TIMER_US));
            HrTimerRestart::Restart
        }
    }

    /// A producer thread, bound to its CPU: starts the CPU's timer, then queues one object after
    /// the other until the pool is used up or the test says stop, and returns only once
    /// `kthread_stop()` is called (so that `kthread_stop()` may be called on it).
    ///
    /// # Safety
    ///
    /// `data` must come from `Arc::as_ptr()` of an `Arc<CpuLoad>` that is kept alive until
    /// `kthread_stop()` has returned for this thread.
    unsafe extern "C" fn producer_thread(data: *mut c_void) -> c_int {
        // SAFETY: `Producers` keeps the `Arc` alive until kthread_stop() returned.
        let load = unsafe { ArcBorrow::<CpuLoad>::from_raw(data.cast_const().cast()) };
        let s = &load.stress;
        let me = CpuId::current();
        let in_queue = s.in_queue.get(me.as_u32() as usize);
        // The next online CPU, whose thread this one interrupts; none if this one is alone.
        let peer = percpu::possible_cpus()
            .filter(|c| percpu::cpu_online(*c))
            .find(|c| c.as_u32() > me.as_u32())
            .or_else(|| percpu::possible_cpus().find(|c| percpu::cpu_online(*c)))
            .filter(|c| *c != me);
        // Pinned: it fires on this CPU, the one this thread is bound to. Cancelled on drop.
        let timer = Arc::from(load).start(Delta::from_micros(NEST_TIMER_US));
        let mut n: u32 = 0;
        // SAFETY: Called from a kthread.
        while !unsafe { bindings::kthread_should_stop() } {
            if s.stop.load(Relaxed) || !in_queue.is_some_and(|f| s.produce_flagged(f)) {
                fsleep(Delta::from_millis(1));
                continue;
            }
            n = n.wrapping_add(1);
            if let Some(peer) = peer.filter(|_| n % NEST_KICK_EVERY == 0) {
                s.kick(peer, (n / NEST_KICK_EVERY) % 2 == 1);
            }
        }
        drop(timer);
        0
    }

    /// The producer threads of [`nested_producers_on_every_cpu`], one per online CPU; stopped,
    /// with their timers, on drop, which also waits for the IPIs they sent.
    struct Producers {
        stress: Arc<Stress>,
        threads: KVec<(NonNull<bindings::task_struct>, Arc<CpuLoad>)>,
    }

    impl Producers {
        fn start(stress: &Arc<Stress>) -> Result<Self> {
            let mut this = Producers {
                stress: stress.clone(),
                threads: KVec::new(),
            };
            for cpu in percpu::possible_cpus().filter(|c| percpu::cpu_online(*c)) {
                let load = Arc::pin_init(
                    pin_init!(CpuLoad {
                        timer <- HrTimer::new(),
                        stress: stress.clone(),
                    }),
                    GFP_KERNEL,
                )?;
                this.threads.reserve(1, GFP_KERNEL)?;
                // SAFETY: `producer_thread` has the signature of a thread function and `load`
                // stays in `this.threads` until `Drop` has stopped the thread.
                let task = unsafe {
                    bindings::kthread_create_on_cpu(
                        Some(producer_thread),
                        Arc::as_ptr(&load).cast_mut().cast(),
                        cpu.as_u32(),
                        c"ls_defer_kunit/%u".as_char_ptr(),
                    )
                };
                let task = NonNull::new(kernel::error::from_err_ptr(task)?).ok_or(ENOMEM)?;
                if let Err(e) = this.threads.push_within_capacity((task, load)) {
                    // Never woken: it exits without running `producer_thread`.
                    // SAFETY: `task` is a kthread created above.
                    unsafe { bindings::kthread_stop(task.as_ptr()) };
                    drop(e);
                    return Err(ENOMEM);
                }
                // SAFETY: `task` is a kthread created above, not woken yet.
                unsafe { bindings::wake_up_process(task.as_ptr()) };
            }
            Ok(this)
        }
    }

    impl Drop for Producers {
        fn drop(&mut self) {
            self.stress.stop.store(true, Relaxed);
            for (task, _) in self.threads.iter() {
                // SAFETY: `task` was created by kthread_create_on_cpu() and stopped by no one
                // else; `producer_thread` returns only once asked to, so it has not exited.
                unsafe { bindings::kthread_stop(task.as_ptr()) };
            }
            // No new IPI: their senders are gone.
            if !wait_until(|| self.stress.ipis_in_flight.load(Acquire) == 0, 10_000) {
                self.stress.ipis_stuck.store(true, Relaxed);
                // Never free what an IPI callback may still use.
                core::mem::forget(self.stress.clone());
            }
        }
    }

    /// What one round of [`nested_producers_on_every_cpu`] did, or the sum of several.
    #[derive(Default)]
    struct NestRound {
        /// Rounds whose IPIs did not all finish (their `Stress` is leaked).
        ipis_stuck: usize,
        claimed: usize,
        produced: usize,
        freed: usize,
        bad: usize,
        /// Objects not freed exactly once (lost, or freed more than once).
        not_once: usize,
        queued: usize,
        engine_freed: usize,
        task: usize,
        hardirq: usize,
        nmi: usize,
        nested: usize,
        /// Objects the chain had not freed [`NEST_SETTLE_MS`] after the producers stopped,
        /// before the flush: stranded.
        stranded: usize,
        /// Why a round had no NMIs, if one had none.
        no_nmi: Option<&'static CStr>,
    }

    /// How long the chain alone gets, after a round's producers stopped, to free everything.
    const NEST_SETTLE_MS: u32 = 10_000;

    impl NestRound {
        fn accumulate(&mut self, r: &NestRound) {
            self.ipis_stuck = self.ipis_stuck.saturating_add(r.ipis_stuck);
            self.claimed = self.claimed.saturating_add(r.claimed);
            self.produced = self.produced.saturating_add(r.produced);
            self.freed = self.freed.saturating_add(r.freed);
            self.bad = self.bad.saturating_add(r.bad);
            self.not_once = self.not_once.saturating_add(r.not_once);
            self.queued = self.queued.saturating_add(r.queued);
            self.engine_freed = self.engine_freed.saturating_add(r.engine_freed);
            self.task = self.task.saturating_add(r.task);
            self.hardirq = self.hardirq.saturating_add(r.hardirq);
            self.nmi = self.nmi.saturating_add(r.nmi);
            self.nested = self.nested.saturating_add(r.nested);
            self.stranded = self.stranded.saturating_add(r.stranded);
            self.no_nmi = self.no_nmi.or(r.no_nmi);
        }
    }

    /// One round: a fresh pool and engine, the producers of every CPU until the pool is used up
    /// or `deadline_ms` after `start`, then [`NEST_SETTLE_MS`] for the chain alone to free
    /// everything, then a flush.
    fn nested_round(start: &Instant<Monotonic>, deadline_ms: i64) -> Result<NestRound> {
        let stress = Stress::new(NEST_OBJS)?;
        let nmis = nmi::start(&stress)?;
        let producers = Producers::start(&stress)?;

        while stress.pool.cursor.load(Relaxed) < NEST_OBJS
            && start.elapsed().as_millis() < deadline_ms
        {
            nmis.send_all(&stress)?;
            fsleep(Delta::from_micros(100));
        }
        // Threads stopped, timers cancelled and IPIs done; then no NMI handler runs any more.
        drop(producers);
        let no_nmi = nmis.off();
        drop(nmis);

        let claimed = stress.pool.cursor.load(Relaxed).min(NEST_OBJS);
        let (task, hardirq) = (stress.task.load(Relaxed), stress.hardirq.load(Relaxed));
        let (softirq, nmi) = (stress.softirq.load(Relaxed), stress.nmi.load(Relaxed));
        let produced = task + stress.bh_off.load(Relaxed) + softirq + hardirq + nmi;
        // No producer any more, no flush yet: what the chain does not free within the bound
        // (a re-check or re-arm that missed items) is stranded.
        wait_until(|| stress.pool.freed() >= produced, NEST_SETTLE_MS);
        let stranded = produced.saturating_sub(stress.pool.freed());
        if !flush_bounded(&stress.engine) {
            core::mem::forget(stress.clone());
            return Err(ETIMEDOUT);
        }
        // Read right after flush() returned: nothing may still be on its way.
        let freed = stress.pool.freed();
        let total = stress.engine.total_stats();
        Ok(NestRound {
            stranded,
            ipis_stuck: usize::from(stress.ipis_stuck.load(Relaxed)),
            claimed,
            produced,
            freed,
            bad: stress.pool.bad(),
            not_once: stress.pool.not_freed_once(0..claimed),
            queued: total.queued,
            engine_freed: total.freed,
            task,
            hardirq,
            nmi,
            nested: stress.nested.load(Relaxed),
            no_nmi,
        })
    }

    /// Guards: a pending list updated with plain loads and stores (`BROKEN=1`, the shape of
    /// `hlist_add_head()`): an interrupt, NMI or irq_work handler of the same CPU that adds to
    /// the list, or takes it, between the producer's load of the head and its store loses
    /// objects (`freed == produced` fails, `not_once` counts them) or leaves taken ones listed,
    /// to be freed twice (`bad == 0` fails). On every online CPU a bound thread queues in a
    /// tight loop while a pinned hard hrtimer, the IPIs and the NMIs (see [`Nmis`]) that the
    /// other CPUs' threads send queue on top of it, in rounds of [`NEST_OBJS`] objects for
    /// [`NEST_BUDGET_MS`], or until some nesting happened (at most [`NEST_MAX_MS`]);
    /// `nested > 0` checks that the nesting this relies on happened. The other checks are
    /// those of [`producers_in_all_contexts`]. Under TCG a run sees a few
    /// thousand nested objects and, with `BROKEN=1`, loses hundreds. Before each round's flush
    /// the chain alone must have freed everything (`stranded == 0`): producers on every CPU
    /// race the callbacks that re-arm or give the token back, and an item that a missed re-check
    /// or re-arm leaves behind (`BROKEN=kc`) is only ever freed by a flush.
    #[test]
    fn nested_producers_on_every_cpu() -> Result {
        let start = Instant::<Monotonic>::now();
        let mut sum = NestRound::default();
        let mut rounds = 0usize;
        loop {
            // A round produces until its deadline: the budget, or one more budget's worth
            // while waiting for nesting.
            let deadline = start
                .elapsed()
                .as_millis()
                .saturating_add(NEST_BUDGET_MS)
                .clamp(NEST_BUDGET_MS, NEST_MAX_MS);
            sum.accumulate(&nested_round(&start, deadline)?);
            rounds += 1;
            let ms = start.elapsed().as_millis();
            if ms >= NEST_MAX_MS || (ms >= NEST_BUDGET_MS && sum.nested > 0) {
                break;
            }
        }
        pr_info!(
            "nested producers: {} rounds, {} ms: task {}, hardirq {}, nmi {}, {} nested\n",
            rounds,
            start.elapsed().as_millis(),
            sum.task,
            sum.hardirq,
            sum.nmi,
            sum.nested
        );
        pr_info!(
            "nested producers: produced {}, freed {}, not freed once {}, bad {}, \
             stranded without a flush {}\n",
            sum.produced,
            sum.freed,
            sum.not_once,
            sum.bad,
            sum.stranded
        );

        assert_eq!(sum.ipis_stuck, 0);
        assert_eq!(sum.stranded, 0);
        assert_eq!(sum.produced, sum.claimed);
        assert_eq!(sum.freed, sum.produced);
        assert_eq!(sum.not_once, 0);
        assert_eq!(sum.bad, 0);
        assert_eq!(sum.queued, sum.produced);
        assert_eq!(sum.engine_freed, sum.produced);
        assert!(sum.task > 0);
        assert!(sum.hardirq > 0);
        assert!(sum.nested > 0);
        match sum.no_nmi {
            None => assert!(sum.nmi > 0),
            Some(why) => skip(why),
        }
        Ok(())
    }

    // --- b. A sleeping Tasks Trace reader keeps its object --------------------------------------

    /// Guards: an engine that waits for a regular RCU grace period (`BROKEN=2`), or none,
    /// frees the object while the reader sleeps (`intact` fails); one that never frees fails
    /// `freed`.
    #[test]
    fn sleeping_reader_keeps_object() -> Result {
        let pool = Pool::new(1)?;
        let engine = new_engine()?;
        let obj = pool.obj(0).ok_or(EINVAL)?;

        let reader = rcu_tasks_trace::read_lock();
        // The reader "found" the object before it was queued.
        queue(&engine, obj);
        let gp_started = wait_until(|| engine.total_stats().gps == 1, 5_000);
        for _ in 0..3 {
            rcu::synchronize_rcu();
            fsleep(Delta::from_millis(20));
        }
        // SAFETY: The object belongs to `pool`, which is alive; freeing only poisons it.
        let intact = unsafe { obj.as_ref() }.state.load(Relaxed) == ALIVE && pool.freed() == 0;
        drop(reader);

        let freed = wait_until(|| pool.freed() == 1, 30_000);
        let closed = close(engine);

        assert!(closed);
        assert!(gp_started);
        assert!(intact);
        assert!(freed);
        assert!(pool.freed_once(0..1));
        assert_eq!(pool.bad(), 0);
        Ok(())
    }

    // --- c. Items queued during a grace period get the next one ---------------------------------

    /// Guards: without the re-arm in the callback (`BROKEN=kc`) the second object is never freed
    /// (`freed` fails, nothing else kicks the engine); an engine that adds it to the in-flight
    /// batch, or starts a second grace period while one is in flight, fails `gps`; with regular
    /// RCU (`BROKEN=2`) the reader does not hold the first grace period open
    /// (`one_in_flight` fails).
    #[test]
    fn chained_grace_period() -> Result {
        let pool = Pool::new(2)?;
        let engine = new_engine()?;
        let (obj0, obj1) = (pool.obj(0).ok_or(EINVAL)?, pool.obj(1).ok_or(EINVAL)?);

        // SAFETY: Paired with `migrate_enable()` below; both objects go to one CPU.
        unsafe { bindings::migrate_disable() };
        let cpu = CpuId::current();
        let stats = || engine.stats(cpu).unwrap_or_default();

        // Hold the first grace period open.
        let reader = rcu_tasks_trace::read_lock();
        queue(&engine, obj0);
        let first_gp = wait_until(|| stats().gps == 1, 5_000);
        queue(&engine, obj1);
        fsleep(Delta::from_millis(50));
        let one_in_flight = stats().gps == 1 && pool.freed() == 0;
        drop(reader);
        // SAFETY: Pairs with `migrate_disable()` above.
        unsafe { bindings::migrate_enable() };

        // No producer and no flush from here on: only the chain can free `obj1`.
        let freed = wait_until(|| pool.freed() == 2, 30_000);
        let s = stats();
        let closed = close(engine);

        assert!(closed);
        assert!(first_gp);
        assert!(one_in_flight);
        assert!(freed);
        assert_eq!(s.gps, 2);
        assert_eq!(s.batches, 2);
        assert_eq!(s.flushed, 0);
        assert!(pool.freed_once(0..2));
        assert_eq!(pool.bad(), 0);
        Ok(())
    }

    // --- c0. The owner that gives the token back looks once more ------------------------------

    /// Guards: the re-check after the token is given back. The test plays the owner: it holds
    /// the token with nothing to take while a producer queues an object, whose handler finds the
    /// token taken and gives up; giving the token back must then see the object and take the
    /// token again (`retaken` fails without the re-check, `BROKEN=m04`: the object would wait
    /// for the next producer on this CPU, or for ever).
    #[test]
    fn release_rechecks_pending() -> Result {
        let pool = Pool::new(1)?;
        let engine = new_engine()?;
        let pin = MigrateDisabled::new();
        let cpu = CpuId::current();
        let st = engine.state(cpu).ok_or(EINVAL)?;
        // Be the owner, as a handler that found `pending` empty is right before it releases.
        let took = st.in_flight.xchg(1, Full) == 0;
        // A producer: its irq_work runs right away (interrupts are on) and gives up.
        queue(&engine, pool.obj(0).ok_or(EINVAL)?);
        let handler_ran = wait_until(|| !st.work.is_busy(), 1_000);
        let held = pool.freed() == 0 && !st.pending.is_empty();
        drop(pin);
        // SAFETY: The test owns the token; the fresh engine's batch is empty and nothing of
        // this CPU is queued.
        let retaken = took && unsafe { st.release() };
        if retaken {
            // SAFETY: `release()` gave the token back to us, with `batch` still empty.
            unsafe { st.start_or_release() };
        }
        let freed = wait_until(|| pool.freed() == 1, 10_000);
        // The drop's flush frees the object if nothing else did.
        let closed = close(engine);

        assert!(closed);
        assert!(took);
        assert!(handler_ran);
        assert!(held);
        assert!(retaken);
        assert!(freed);
        assert!(pool.freed_once(0..1));
        Ok(())
    }

    // --- c0b. The token is given back with a fully ordered xchg: a litmus test ------------------

    /// Most rounds of [`release_is_fully_ordered`], and most time it runs for.
    const LITMUS_ROUNDS: u32 = 4_000_000;
    const LITMUS_MS: i64 = 4_000;

    /// Shared by [`release_is_fully_ordered`] (the owner) and its producer thread.
    struct Litmus {
        engine: Pin<KBox<Engine<TestObj>>>,
        pool: Pool,
        /// The CPU whose state both play on: the owner's.
        cpu: CpuId,
        /// The round the owner has started; the producer plays each once.
        round: Atomic<u32>,
        /// The last round the producer has played.
        acked: Atomic<u32>,
        /// Whether the producer took the token in round `acked`.
        took: Atomic<bool>,
        /// Set by the test when it is done.
        stop: Atomic<bool>,
    }

    /// Spins for `n` rounds of `cpu_relax()`: the offset between the two sides of a round.
    fn litmus_delay(n: u32) {
        for _ in 0..n {
            cpu_relax();
        }
    }

    /// The producer of [`release_is_fully_ordered`], on another CPU than the owner. Each round,
    /// after a delay that varies from round to round, it does what a producer and its irq_work
    /// handler do on a CPU whose token is taken: adds to `pending` (`llist_add()`, a full
    /// barrier), then tries to take the token with a fully ordered `xchg(1)` and gives up if it
    /// was taken. Returns only once `kthread_stop()` is called.
    ///
    /// # Safety
    ///
    /// `data` must come from `Arc::as_ptr()` of an `Arc<Litmus>` that is kept alive until
    /// `kthread_stop()` has returned for this thread.
    unsafe extern "C" fn litmus_producer(data: *mut c_void) -> c_int {
        // SAFETY: The test keeps the `Arc` alive until kthread_stop() returned.
        let l = unsafe { ArcBorrow::<Litmus>::from_raw(data.cast_const().cast()) };
        let st = l.engine.state(l.cpu);
        let obj = l.pool.obj(0);
        let mut seen: u32 = 0;
        let mut idle: u32 = 0;
        // SAFETY: Called from a kthread.
        while !unsafe { bindings::kthread_should_stop() } {
            let r = l.round.load(Acquire);
            let (Some(st), Some(obj)) = (st, obj) else {
                fsleep(Delta::from_millis(1));
                continue;
            };
            if r == seen || l.stop.load(Relaxed) {
                idle = idle.wrapping_add(1);
                if l.stop.load(Relaxed) {
                    fsleep(Delta::from_millis(1));
                } else if idle % 4096 == 0 {
                    might_sleep();
                } else {
                    cpu_relax();
                }
                continue;
            }
            seen = r;
            litmus_delay(r.wrapping_mul(2_654_435_761) >> 28);
            // SAFETY: The owner took the object off `pending` before it started the round, and
            // it is never freed: no grace period, no free, only the two lists of this test.
            unsafe { st.pending.add(obj) };
            let took = st.in_flight.xchg(1, Full) == 0;
            l.took.store(took, Relaxed);
            l.acked.store(r, Release);
        }
        0
    }

    /// Guards: the owner gives the token back with a fully ordered `xchg(0)`, so that its
    /// re-check of `pending` cannot be satisfied before the release is visible (store->load
    /// ordering, the one a release store does not give; see "The token" in the module
    /// documentation). A litmus test of the store-buffering shape, on two CPUs: the test holds
    /// the token of its CPU with nothing to take and calls `release()` while a thread on another
    /// CPU adds an object to that CPU's `pending` and tries to take the token, as a producer's
    /// handler does. In every round one of them must end up with the token and the object: the
    /// release's re-check sees the object and takes the token back, or the thread's `xchg(1)`
    /// reads the released token. A round where both miss leaves the object stranded (no owner,
    /// no irq_work to come). With `store(0, Release)` instead (`BROKEN=m02`) that outcome is
    /// allowed on x86-64 and arm64 (a store may wait in the store buffer while a later load
    /// runs); whether a guest under TCG shows it depends on the host. The rounds start in step,
    /// with a delay that varies per round on each side to sweep their offset.
    #[test]
    fn release_is_fully_ordered() -> Result {
        let pin = MigrateDisabled::new();
        let cpu = CpuId::current();
        let Some(other) = percpu::possible_cpus().find(|c| *c != cpu && percpu::cpu_online(*c))
        else {
            drop(pin);
            skip(c"needs a second online CPU");
            return Ok(());
        };
        let l = Arc::new(
            Litmus {
                engine: new_engine()?,
                pool: Pool::new(1)?,
                cpu,
                round: Atomic::new(0),
                acked: Atomic::new(0),
                took: Atomic::new(false),
                stop: Atomic::new(false),
            },
            GFP_KERNEL,
        )?;
        let st = l.engine.state(cpu).ok_or(EINVAL)?;
        // SAFETY: `litmus_producer` has the signature of a thread function, and `l` lives until
        // the kthread_stop() below.
        let task = unsafe {
            bindings::kthread_create_on_cpu(
                Some(litmus_producer),
                Arc::as_ptr(&l).cast_mut().cast(),
                other.as_u32(),
                c"ls_defer_litmus/%u".as_char_ptr(),
            )
        };
        let task = NonNull::new(kernel::error::from_err_ptr(task)?).ok_or(ENOMEM)?;
        // SAFETY: `task` is a kthread created above, not woken yet.
        unsafe { bindings::wake_up_process(task.as_ptr()) };

        // Own the token of this CPU, as a handler that found `pending` empty does.
        let took = st.in_flight.xchg(1, Full) == 0;
        let start = Instant::<Monotonic>::now();
        let (mut rounds, mut stranded, mut lost_acks): (u32, u32, u32) = (0, 0, 0);
        let mut producer_took: u32 = 0;
        while took && rounds < LITMUS_ROUNDS {
            let r = rounds.wrapping_add(1);
            l.round.store(r, Release);
            litmus_delay(r.wrapping_mul(40_503) >> 28);
            // SAFETY: The test owns the token and `batch` is empty.
            let retaken = unsafe { st.release() };
            // Wait for the producer's half of the round (bounded: it may be preempted).
            let mut spins: u32 = 0;
            while l.acked.load(Acquire) != r && spins < 10_000_000 {
                cpu_relax();
                spins += 1;
            }
            if l.acked.load(Acquire) != r {
                lost_acks += 1;
                break;
            }
            let producer_has_it = l.took.load(Relaxed);
            if producer_has_it {
                producer_took += 1;
            }
            if !retaken && !producer_has_it {
                stranded += 1;
            }
            // Take the object back and own the token again for the next round.
            drop(st.pending.del_all());
            st.in_flight.store(1, Relaxed);
            rounds = r;
            if rounds % 1024 == 0 {
                if start.elapsed().as_millis() >= LITMUS_MS {
                    break;
                }
                might_sleep();
            }
        }
        let ms = start.elapsed().as_millis();
        l.stop.store(true, Relaxed);
        drop(pin);
        // SAFETY: `task` was created above and stopped by no one else; `litmus_producer`
        // returns only once asked to, so it has not exited.
        unsafe { bindings::kthread_stop(task.as_ptr()) };
        // Leave the engine as found: no token, nothing queued.
        drop(st.pending.del_all());
        st.in_flight.store(0, Release);
        pr_info!(
            "release_is_fully_ordered: {rounds} rounds in {ms} ms on CPUs {} and {}, the \
             producer took the token in {producer_took}, stranded {stranded}\n",
            cpu.as_u32(),
            other.as_u32()
        );

        assert!(took);
        assert_eq!(lost_acks, 0);
        assert!(rounds >= 10_000);
        assert_eq!(stranded, 0);
        Ok(())
    }

    // --- c1. A flush waits for readers too ------------------------------------------------------

    /// Shared by [`flush_waits_for_readers`] and its sleeping reader.
    struct FlushReader {
        pool: Pool,
        /// Set by the reader once inside its read-side critical section.
        reading: Atomic<bool>,
        /// Set by the test right before it calls `flush()`.
        flushing: Atomic<bool>,
        /// Whether the reader saw the test flushing before it looked at the object.
        saw_flushing: Atomic<bool>,
        /// Whether the object was still alive when the reader looked, before leaving.
        intact: Atomic<bool>,
        /// Set by the reader as its last access.
        done: Atomic<bool>,
    }

    /// Starts a reader that enters a Tasks Trace read-side critical section, waits (at most
    /// 5 s) for the test to start flushing, sleeps `hold_ms` more, records whether the last
    /// object of a pool of `objs` is still alive, and leaves. Returns once it is reading, or
    /// with `reading` unset after 5 s.
    fn start_flush_reader(objs: usize, hold_ms: i64) -> Result<Arc<FlushReader>> {
        let h = Arc::new(
            FlushReader {
                pool: Pool::new(objs)?,
                reading: Atomic::new(false),
                flushing: Atomic::new(false),
                saw_flushing: Atomic::new(false),
                intact: Atomic::new(false),
                done: Atomic::new(false),
            },
            GFP_KERNEL,
        )?;
        let r = h.clone();
        free_queue().try_spawn(GFP_KERNEL, move || {
            let guard = rcu_tasks_trace::read_lock();
            r.reading.store(true, Release);
            let saw = wait_until(|| r.flushing.load(Acquire), 5_000);
            // Let the flush take what it takes and, if it does not wait, free it.
            fsleep(Delta::from_millis(hold_ms));
            r.saw_flushing.store(saw, Relaxed);
            let alive = r
                .pool
                .objs
                .last()
                .is_some_and(|o| o.state.load(Relaxed) == ALIVE);
            r.intact.store(alive, Relaxed);
            drop(guard);
            r.done.store(true, Release);
        })?;
        wait_until(|| h.reading.load(Acquire), 5_000);
        Ok(h)
    }

    /// Tells `h`'s reader that the test flushes, flushes `engine` (bounded) and closes it.
    /// Returns the objects freed right when the flush returned, the engine's `flushed` count,
    /// and whether the reader finished; fails if the flush or the close gave up.
    fn flush_under_reader(
        h: &FlushReader,
        engine: Pin<KBox<Engine<TestObj>>>,
    ) -> Result<(usize, usize, bool)> {
        h.flushing.store(true, Release);
        let returned = flush_bounded(&engine);
        // Read right after flush() returned.
        let freed = h.pool.freed();
        let done = wait_until(|| h.done.load(Acquire), 10_000);
        let flushed = engine.total_stats().flushed;
        if !close_after(returned, engine) {
            return Err(ETIMEDOUT);
        }
        Ok((freed, flushed, done))
    }

    /// Guards: a flush frees what it took from the lists only after a grace period that
    /// started after the take. A reader that found the second object before it was queued
    /// sleeps in its read-side critical section while the test flushes; the first object holds
    /// the CPU's chain, so the flush takes the second one from the list itself. One that frees
    /// at once (`BROKEN=m08`) frees it under the sleeping reader (`intact` fails).
    #[test]
    fn flush_waits_for_readers() -> Result {
        let h = start_flush_reader(2, 200)?;
        let engine = new_engine()?;
        let reading = h.reading.load(Acquire);

        let pin = MigrateDisabled::new();
        let cpu = CpuId::current();
        queue(&engine, h.pool.obj(0).ok_or(EINVAL)?);
        let first_gp = wait_until(|| engine.stats(cpu).unwrap_or_default().gps == 1, 5_000);
        queue(&engine, h.pool.obj(1).ok_or(EINVAL)?);
        drop(pin);
        let (freed, flushed, done) = flush_under_reader(&h, engine)?;

        assert!(reading);
        assert!(first_gp);
        assert!(done);
        assert!(h.saw_flushing.load(Relaxed));
        assert_eq!(flushed, 1);
        assert!(h.intact.load(Relaxed));
        assert_eq!(freed, 2);
        assert!(h.pool.freed_once(0..2));
        assert_eq!(h.pool.bad(), 0);
        Ok(())
    }

    /// Guards: a flush waits for the batches that owners took before it, not only for what it
    /// took itself. A reader holds the grace period of a batch in flight, and nothing is left
    /// in the lists; a flush that does not wait for the chain (`BROKEN=m09`) returns at once,
    /// with the batch not freed (`freed` fails). An engine dropped after it would then free its
    /// per-CPU state under a batch still in flight.
    #[test]
    fn flush_waits_for_batches_in_flight() -> Result {
        let h = start_flush_reader(1, 300)?;
        let engine = new_engine()?;
        let reading = h.reading.load(Acquire);

        let pin = MigrateDisabled::new();
        let cpu = CpuId::current();
        queue(&engine, h.pool.obj(0).ok_or(EINVAL)?);
        let in_flight = wait_until(|| engine.stats(cpu).unwrap_or_default().gps == 1, 5_000);
        drop(pin);
        let (freed, flushed, done) = flush_under_reader(&h, engine)?;

        assert!(reading);
        assert!(in_flight);
        assert!(done);
        assert!(h.saw_flushing.load(Relaxed));
        assert_eq!(flushed, 0);
        assert_eq!(freed, 1);
        assert!(h.pool.freed_once(0..1));
        Ok(())
    }

    /// Shared by [`flush_counts_a_batch_being_taken`] and its flusher. The engine is declared
    /// first: it is dropped, and flushed, before the pool.
    struct TakeFlush {
        engine: Pin<KBox<Engine<TestObj>>>,
        pool: Pool,
        /// Whether the flusher saw the owner held in its take.
        saw_take: Atomic<bool>,
        /// Whether the flusher's flush returned within [`FLUSH_LIMIT_MS`].
        returned: Atomic<bool>,
        /// Objects freed when the flusher's flush returned.
        freed_at_return: Atomic<usize>,
        done: Atomic<bool>,
    }

    /// Guards: an owner counts a batch in `started` before it takes `pending`, so that a flush
    /// whose own take follows the owner's waits for that batch. The test stops an owner (a
    /// hotplug-style kick from task context) right after its take, before its grace period, and
    /// flushes from another thread meanwhile: the flush must not return before the batch is
    /// freed. An owner that counts after its take (`BROKEN=m05`) lets the flush read a
    /// `started` that misses the batch and return at once (`freed_at_return` fails): an engine
    /// dropped after it would free its per-CPU state under that batch.
    #[test]
    fn flush_counts_a_batch_being_taken() -> Result {
        let s = Arc::new(
            TakeFlush {
                engine: new_engine()?,
                pool: Pool::new(1)?,
                saw_take: Atomic::new(false),
                returned: Atomic::new(false),
                freed_at_return: Atomic::new(0),
                done: Atomic::new(false),
            },
            GFP_KERNEL,
        )?;
        let cpu = CpuId::current();
        // An object left in the list with no handler queued, as by an NMI on a CPU going down.
        // SAFETY: As for `queue()`.
        let listed = unsafe { s.engine.queue_offline(cpu, s.pool.obj(0).ok_or(EINVAL)?) };
        let f = s.clone();
        free_queue().try_spawn(GFP_KERNEL, move || {
            let saw = wait_until(|| TAKE_HOOK.load(Acquire) == TAKE_HELD, 5_000);
            f.saw_take.store(saw, Relaxed);
            let returned = !saw || flush_bounded(&f.engine);
            f.freed_at_return.store(f.pool.freed(), Relaxed);
            f.returned.store(returned, Relaxed);
            TAKE_HOOK.store(TAKE_FLUSHED, Release);
            if !returned {
                core::mem::forget(f.clone());
            }
            f.done.store(true, Release);
        })?;
        TAKE_HOOK.store(TAKE_ARMED, Release);
        // Takes the list; the hook holds us right after the take.
        s.engine.kick_cpu(cpu);
        let done = wait_until(|| s.done.load(Acquire), 2 * FLUSH_LIMIT_MS as u32);
        TAKE_HOOK.store(TAKE_IDLE, Relaxed);
        let freed = wait_until(|| s.pool.freed() == 1, 10_000);
        if !done {
            core::mem::forget(s.clone());
        }

        assert!(listed);
        assert!(done);
        assert!(s.saw_take.load(Relaxed));
        assert!(s.returned.load(Relaxed));
        assert_eq!(s.freed_at_return.load(Relaxed), 1);
        assert!(freed);
        assert!(s.pool.freed_once(0..1));
        Ok(())
    }

    // --- c2. A large batch is freed in bounded steps -------------------------------------------

    /// Objects queued on one CPU while [`bounded_steps_after_held_grace_period`] holds the grace
    /// period.
    const BIG_BATCH: usize = 100_000;
    /// How long it holds the grace period, at least.
    const BIG_HOLD_MS: i64 = 2_000;
    /// The most objects a step may free: [`FREE_CHUNK`], written out so that a change of the
    /// constant (`BROKEN=kb`) shows.
    const STEP_BOUND: usize = 64;

    /// Guards: a sleeping reader holds the first grace period for two seconds while 100,000
    /// objects are queued on one CPU; they form one batch, which must then be freed in steps of
    /// at most [`FREE_CHUNK`] objects, continued in the free work (`max_step` and `offloads`
    /// fail for an engine that frees a whole batch in its RCU callback, with bottom halves
    /// disabled: `BROKEN=kb`), by the chain alone (no flush), and in a few grace periods
    /// (`gps`: batching), with migration disabled (`migratable`: `BROKEN=m13`). Prints the
    /// longest step, in objects and nanoseconds.
    #[test]
    fn bounded_steps_after_held_grace_period() -> Result {
        let pool = Pool::new(BIG_BATCH)?;
        let engine = new_engine()?;

        let reader = rcu_tasks_trace::read_lock();
        let start = Instant::<Monotonic>::now();
        let pin = MigrateDisabled::new();
        let cpu = CpuId::current();
        for i in 0..BIG_BATCH {
            queue(&engine, pool.obj(i).ok_or(EINVAL)?);
        }
        drop(pin);
        let left = BIG_HOLD_MS - start.elapsed().as_millis();
        if left > 0 {
            fsleep(Delta::from_millis(left));
        }
        let held = pool.freed() == 0;
        drop(reader);

        // No producer and no flush from here on: only the chain and the free work free them.
        let freed = wait_until(|| pool.freed() == BIG_BATCH, 60_000);
        let s = engine.stats(cpu).unwrap_or_default();
        kernel::pr_info!(
            "bounded_steps: {} objects on CPU {} after {} ms: {} grace periods, {} batches, \
             {} offloaded, longest step {} objects, {} ns\n",
            s.freed,
            cpu.as_u32(),
            start.elapsed().as_millis(),
            s.gps,
            s.batches,
            s.offloads,
            s.max_step,
            s.max_step_ns
        );
        let closed = close(engine);

        assert!(closed);
        assert!(held);
        assert!(freed);
        assert!(pool.freed_once(0..BIG_BATCH));
        assert_eq!(pool.bad(), 0);
        assert_eq!(s.flushed, 0);
        assert_eq!(pool.migratable(), 0);
        assert!(s.max_step <= STEP_BOUND);
        assert!(s.offloads >= 1);
        assert!(s.gps <= 3);
        Ok(())
    }

    // --- d. Flush and CPU hotplug ---------------------------------------------------------------

    #[cfg(CONFIG_HOTPLUG_CPU)]
    struct HotCtx<'a> {
        pool: &'a Pool,
        engine: &'a Engine<TestObj>,
        n: usize,
    }

    /// IPI callback: queues `n` objects on the target CPU, in hard interrupt context.
    ///
    /// # Safety
    ///
    /// `info` must point to a live [`HotCtx`].
    #[cfg(CONFIG_HOTPLUG_CPU)]
    unsafe extern "C" fn ipi_produce_on(info: *mut c_void) {
        // SAFETY: `info` is a `HotCtx` on the caller's stack; the call waits for us.
        let ctx = unsafe { &*info.cast::<HotCtx<'_>>() };
        for _ in 0..ctx.n {
            if let Some(obj) = ctx.pool.claim() {
                queue(ctx.engine, obj);
            }
        }
    }

    /// Guards: a flush that skips offline CPUs leaves the stranded objects (`flushed_all`
    /// fails: `BROKEN=m11`), so does one that does not wait for the batches owners had taken;
    /// without the hotplug kick the last objects are never freed (`kicked` fails). The flush
    /// frees with migration disabled (`migratable`: `BROKEN=m14`).
    #[test]
    fn flush_and_cpu_hotplug() -> Result {
        #[cfg(not(CONFIG_HOTPLUG_CPU))]
        {
            skip(c"needs CONFIG_HOTPLUG_CPU");
            Ok(())
        }
        #[cfg(CONFIG_HOTPLUG_CPU)]
        {
            hotplug_body()
        }
    }

    #[cfg(CONFIG_HOTPLUG_CPU)]
    fn hotplug_body() -> Result {
        const K: usize = 64;
        let Some(target) = percpu::possible_cpus()
            .filter(|c| c.as_u32() != 0 && percpu::cpu_online(*c))
            .last()
        else {
            skip(c"needs a second online CPU");
            return Ok(());
        };
        let pool = Pool::new(3 * K)?;
        let engine = new_engine()?;

        // Objects queued on the target by a real producer just before it goes away.
        let ctx = HotCtx {
            pool: &pool,
            engine: &engine,
            n: K,
        };
        // SAFETY: `ctx` outlives the call, which waits for the callback.
        let ret = unsafe {
            bindings::smp_call_function_single(
                i32::try_from(target.as_u32())?,
                Some(ipi_produce_on),
                (&raw const ctx).cast_mut().cast(),
                true,
            )
        };
        kernel::error::to_result(ret)?;

        // SAFETY: FFI call; the CPU is brought back below.
        if unsafe { bindings::remove_cpu(target.as_u32()) } != 0 {
            close(engine);
            skip(c"remove_cpu() failed");
            return Ok(());
        }

        // Let the chain that the first objects started finish and give its token back:
        // otherwise its callback would rightly take what we add next.
        let st = engine.state(target).ok_or(EINVAL)?;
        let chain_idle = wait_until(
            || pool.freed() == K && st.in_flight.load(Acquire) == 0,
            30_000,
        );

        // What an NMI producer on the dying CPU leaves: objects in its list, no irq_work.
        for i in K..2 * K {
            let obj = pool.obj(i).ok_or(EINVAL)?;
            // SAFETY: As for `queue()`.
            unsafe { engine.queue_offline(target, obj) };
        }
        pool.cursor.store(3 * K, Relaxed);
        rcu_tasks_trace::synchronize_rcu_tasks_trace();
        rcu_tasks_trace::synchronize_rcu_tasks_trace();
        let stranded = pool.none_freed(K..2 * K);

        let returned = flush_bounded(&engine);
        let flushed_all = pool.freed_once(0..2 * K);

        // The same, picked up by the CPU hotplug "dead" kick instead of a flush.
        for i in 2 * K..3 * K {
            let obj = pool.obj(i).ok_or(EINVAL)?;
            // SAFETY: As for `queue()`.
            unsafe { engine.queue_offline(target, obj) };
        }
        engine.kick_cpu(target);
        let kicked = wait_until(|| pool.freed() == 3 * K, 30_000);

        // SAFETY: FFI call; brings back the CPU taken down above.
        let back = unsafe { bindings::add_cpu(target.as_u32()) } == 0;
        let closed = close_after(returned, engine);

        assert!(returned);
        assert!(closed);
        assert!(chain_idle);
        assert!(stranded);
        assert!(flushed_all);
        assert!(kicked);
        assert!(back);
        assert_eq!(pool.migratable(), 0);
        assert!(pool.freed_once(0..3 * K));
        assert_eq!(pool.bad(), 0);
        Ok(())
    }

    /// A zeroed element, as one unlinked from a map that is gone (`smap` is NULL), so that
    /// `Selem::free` only `kfree()`s it; ownership passes to the caller.
    #[cfg(CONFIG_HOTPLUG_CPU)]
    fn fake_selem() -> Result<NonNull<Selem>> {
        use kernel::alloc::{
            allocator::Kmalloc,
            flags,
            Allocator,
            NumaNode, //
        };
        let layout = core::alloc::Layout::new::<bindings::bpf_local_storage_elem>();
        let mem = Kmalloc::alloc(layout, GFP_KERNEL | flags::__GFP_ZERO, NumaNode::NO_NODE)?;
        // A zeroed element: `smap` is NULL, the node is free; `kfree()` takes it back.
        Ok(mem.cast())
    }

    /// Queues `n` fake elements on `cpu`'s list of the real element engine, with no irq_work.
    #[cfg(CONFIG_HOTPLUG_CPU)]
    fn leave_selems(engine: &Engine<Selem>, cpu: CpuId, n: usize) -> Result {
        for _ in 0..n {
            let selem = fake_selem()?;
            // SAFETY: A fresh element that nobody else can see, whose node is on no list.
            unsafe { engine.queue_offline(cpu, selem) };
        }
        Ok(())
    }

    /// Guards: the CPU hotplug callbacks registered by the engine's init. Objects left on the
    /// list of a CPU that goes down, with no irq_work queued for them (an NMI producer in the
    /// dying CPU's last moments), must be freed while it is down, by the "dead" callback's kick
    /// (`dead_kicked` fails if it does nothing: `BROKEN=m15`); objects left while it was down
    /// must be freed once it is back, by the "online" callback's kick (`online_kicked`,
    /// `BROKEN=m16`). Drives the real element engine with zeroed elements that no map owns.
    #[test]
    fn cpuhp_callbacks_kick_leftovers() -> Result {
        #[cfg(not(CONFIG_HOTPLUG_CPU))]
        {
            skip(c"needs CONFIG_HOTPLUG_CPU");
            Ok(())
        }
        #[cfg(CONFIG_HOTPLUG_CPU)]
        {
            cpuhp_body()
        }
    }

    #[cfg(CONFIG_HOTPLUG_CPU)]
    fn cpuhp_body() -> Result {
        const K: usize = 16;
        let Some(engine) = SELEMS.as_ref() else {
            skip(c"the element engine is not initialised");
            return Ok(());
        };
        let Some(target) = percpu::possible_cpus()
            .filter(|c| c.as_u32() != 0 && percpu::cpu_online(*c))
            .last()
        else {
            skip(c"needs a second online CPU");
            return Ok(());
        };
        let freed = |base: usize| {
            engine
                .stats(target)
                .map_or(0, |s| s.freed.wrapping_sub(base))
        };
        let base = engine.stats(target).map_or(0, |s| s.freed);

        // Left on the list of a CPU that then goes down.
        leave_selems(engine, target, K)?;
        // SAFETY: FFI call; the CPU is brought back below.
        if unsafe { bindings::remove_cpu(target.as_u32()) } != 0 {
            engine.kick_cpu(target);
            skip(c"remove_cpu() failed");
            return Ok(());
        }
        let dead_kicked = wait_until(|| freed(base) >= K, 5_000);

        // Left while it is down: nobody kicks it until it is back.
        leave_selems(engine, target, K)?;
        fsleep(Delta::from_millis(200));
        let stayed = freed(base) == K || !dead_kicked;
        // SAFETY: FFI call; brings back the CPU taken down above.
        let back = unsafe { bindings::add_cpu(target.as_u32()) } == 0;
        let online_kicked = wait_until(|| freed(base) >= 2 * K, 5_000);
        if !online_kicked {
            // Do not leave them behind for the selftests' counts.
            engine.kick_cpu(target);
            wait_until(|| freed(base) >= 2 * K, 5_000);
        }

        assert!(back);
        assert!(dead_kicked);
        assert!(stayed);
        assert!(online_kicked);
        Ok(())
    }

    // --- e. Flush leaves no irq_work behind -----------------------------------------------------

    /// How long the target CPU of [`flush_leaves_no_irq_work_pending`] keeps its interrupts off
    /// after the test started flushing, at most.
    const HOLD_MS: i64 = 200;
    /// How long it waits, interrupts off, for the test to start flushing, at most.
    const HOLD_PRE_MS: i64 = 2_000;
    /// Attempts of [`flush_leaves_no_irq_work_pending`] spoiled by a stall of the test's CPU.
    const HOLD_ATTEMPTS: u32 = 5;

    /// Shared by [`flush_leaves_no_irq_work_pending`] and its IPI callback on the target CPU.
    struct Holdup<'a> {
        engine: &'a Engine<TestObj>,
        /// Set by the callback once it queued its CPU's irq_work; `busy` tells the result.
        queued: Atomic<bool>,
        busy: Atomic<bool>,
        /// Set by the test right before it calls `flush()`.
        flushing: Atomic<bool>,
        /// Set by the test once `flush()` returned.
        release: Atomic<bool>,
        /// Set by the callback when it gave up waiting for `release` after `flushing`.
        timed_out: Atomic<bool>,
        /// Set by the callback when it gave up waiting for `flushing`: the test's CPU stalled
        /// (at boot, a synchronous IPI to the target, e.g. for text patching, waits with
        /// preemption off until the target's interrupts are on again), the attempt tells nothing.
        gave_up_early: Atomic<bool>,
        /// Set by the callback as its last access to the struct.
        done: Atomic<bool>,
    }

    /// IPI callback, interrupts off: makes the engine's irq_work pending on this CPU, then keeps
    /// interrupts off, so that it cannot run, until the test's `flush()` returned, or for
    /// [`HOLD_MS`] after it started.
    ///
    /// # Safety
    ///
    /// `info` must point to a [`Holdup`] that stays alive until its `done` is set.
    unsafe extern "C" fn ipi_hold_irq_work(info: *mut c_void) {
        // SAFETY: The test keeps `info` alive until we set `done`, our last access.
        let h = unsafe { &*info.cast::<Holdup<'_>>() };
        if let Some(st) = h.engine.state(CpuId::current()) {
            // The state a producer leaves when another owner (the chain's callback, a flush)
            // took its objects before its handler ran: irq_work pending, list empty. Not an
            // object of ours: flush() would take it and wait for a Tasks Trace grace period,
            // which cannot end while this CPU keeps interrupts off (SRCU-fast waits for a
            // regular RCU grace period), so flush() would return after the handler ran, with
            // or without its irq_work_sync().
            //
            // SAFETY: `st` lives until the engine is dropped; the test lets the irq_work run
            // first.
            unsafe { st.work.queue() };
            h.busy.store(st.work.is_busy(), Relaxed);
        }
        h.queued.store(true, Release);

        let mut since = Instant::<Monotonic>::now();
        let mut limit = HOLD_PRE_MS;
        let mut flushing = false;
        while !h.release.load(Acquire) {
            if !flushing && h.flushing.load(Acquire) {
                flushing = true;
                since = Instant::<Monotonic>::now();
                limit = HOLD_MS;
            }
            if since.elapsed().as_millis() >= limit {
                h.timed_out.store(flushing, Relaxed);
                h.gave_up_early.store(!flushing, Relaxed);
                break;
            }
            cpu_relax();
        }
        h.done.store(true, Release);
    }

    /// What one attempt of [`flush_leaves_no_irq_work_pending`] saw.
    #[derive(Default)]
    struct HoldOutcome {
        ret: c_int,
        queued: bool,
        pending: bool,
        idle_after_flush: bool,
        flush_waited: bool,
        idle_later: bool,
        gave_up_early: bool,
        flush_returned: bool,
    }

    /// Holds `target`'s interrupts off with its irq_work pending, and flushes meanwhile.
    fn hold_and_flush(engine: &Engine<TestObj>, target: CpuId) -> HoldOutcome {
        let h = Holdup {
            engine,
            queued: Atomic::new(false),
            busy: Atomic::new(false),
            flushing: Atomic::new(false),
            release: Atomic::new(false),
            timed_out: Atomic::new(false),
            gave_up_early: Atomic::new(false),
            done: Atomic::new(false),
        };
        // SAFETY: `h` outlives the callback: we wait for its `done` below.
        let ret = unsafe {
            bindings::smp_call_function_single(
                c_int::try_from(target.as_u32()).unwrap_or(-1),
                Some(ipi_hold_irq_work),
                (&raw const h).cast_mut().cast(),
                false,
            )
        };
        if ret != 0 {
            return HoldOutcome {
                ret,
                ..HoldOutcome::default()
            };
        }
        let queued = wait_until(|| h.queued.load(Acquire), 1_000);
        h.flushing.store(true, Release);
        let flush_returned = flush_bounded(engine);
        let idle_after_flush = engine.state(target).is_some_and(|st| !st.work.is_busy());
        h.release.store(true, Release);
        // The callback ends on its own within `HOLD_PRE_MS + HOLD_MS`; `h` is ours.
        while !h.done.load(Acquire) {
            fsleep(Delta::from_millis(1));
        }
        // Let the irq_work run before the next attempt or the engine's drop, whatever flush did.
        let idle_later = wait_until(
            || engine.state(target).is_some_and(|st| !st.work.is_busy()),
            1_000,
        );
        HoldOutcome {
            ret,
            queued,
            pending: h.busy.load(Relaxed),
            idle_after_flush,
            flush_waited: h.timed_out.load(Relaxed),
            idle_later,
            gave_up_early: h.gave_up_early.load(Relaxed),
            flush_returned,
        }
    }

    /// Guards: a flush that does not sync every online CPU's irq_work (`BROKEN=kd`) returns
    /// while the target CPU's is still pending (`idle_after_flush` fails) instead of waiting for
    /// the target to run it (`flush_waited` fails). The engine's drop frees the per-CPU state
    /// right after its flush: a pending irq_work would then run on freed memory. An attempt in
    /// which the test's own CPU stalled before it could start flushing is tried again.
    #[test]
    fn flush_leaves_no_irq_work_pending() -> Result {
        let engine = new_engine()?;

        // SAFETY: Paired with `migrate_enable()` below: the target must stay another CPU.
        unsafe { bindings::migrate_disable() };
        let here = CpuId::current();
        let target = percpu::possible_cpus().find(|c| *c != here && percpu::cpu_online(*c));
        let mut o = HoldOutcome::default();
        let mut attempts = 0;
        if let Some(t) = target {
            loop {
                o = hold_and_flush(&engine, t);
                attempts += 1;
                if !o.gave_up_early || o.ret != 0 || !o.idle_later || attempts >= HOLD_ATTEMPTS {
                    break;
                }
            }
        }
        // SAFETY: Pairs with `migrate_disable()` above.
        unsafe { bindings::migrate_enable() };
        let closed = if target.is_none() || o.ret != 0 || (o.idle_later && o.flush_returned) {
            close(engine)
        } else {
            // Never free what a stuck irq_work or an unfinished flush may still use.
            LEAKED.store(true, Relaxed);
            core::mem::forget(engine);
            false
        };

        if target.is_none() {
            skip(c"needs a second online CPU");
            return Ok(());
        }
        kernel::error::to_result(o.ret)?;
        kernel::pr_info!("flush_leaves_no_irq_work_pending: {attempts} attempt(s)\n");
        assert!(o.queued);
        assert!(o.pending);
        assert!(!o.gave_up_early);
        assert!(o.flush_returned);
        assert!(closed);
        assert!(o.idle_after_flush);
        assert!(o.flush_waited);
        assert!(o.idle_later);
        Ok(())
    }
}
