// SPDX-License-Identifier: GPL-2.0

//! Dynamically allocated per-CPU objects.
//!
//! [`PerCpu<T>`] holds one `T` per possible CPU in memory from `__alloc_percpu()`. Every slot is
//! pinned and initialised when the [`PerCpu`] is created and dropped when it is, so a slot can
//! be reached from any CPU, also one that is offline. Code that wants *its* CPU's slot uses
//! [`PerCpu::with_local`], which keeps preemption disabled while it looks at it.
//!
//! Why dynamic allocation rather than static per-CPU variables (`DEFINE_PER_CPU()`): a generic
//! Rust type can be instantiated any number of times (say by a test next to the real user), and
//! static per-CPU variables would need one linker-section definition per instance, written in C
//! or with per-type macros. One `__alloc_percpu()` per instance costs one allocation at init.
//!
//! C header: [`include/linux/percpu.h`](srctree/include/linux/percpu.h)

use crate::{
    alloc::AllocError,
    bindings,
    cpu::CpuId,
    prelude::*,
    types::NotThreadSafe, //
};
use core::{
    marker::PhantomData,
    ptr::NonNull, //
};

/// Returns `true` if `cpu` is online (`cpu_online()`).
///
/// The answer may be stale by the time it is used unless CPU hotplug is held off.
#[inline]
pub fn cpu_online(cpu: CpuId) -> bool {
    // SAFETY: `cpu_online()` only tests a bit of the online mask.
    unsafe { bindings::cpu_online(cpu.as_u32()) }
}

/// Returns `true` if `cpu` is possible (`cpu_possible()`).
#[inline]
pub fn cpu_possible(cpu: CpuId) -> bool {
    // SAFETY: `cpu_possible()` only tests a bit of the possible mask.
    unsafe { bindings::cpu_possible(cpu.as_u32()) }
}

/// Iterator over the possible CPUs, in increasing order (`for_each_possible_cpu()`).
pub struct PossibleCpus {
    /// The CPU returned last, -1 before the first.
    prev: i32,
}

impl Iterator for PossibleCpus {
    type Item = CpuId;

    #[inline]
    fn next(&mut self) -> Option<CpuId> {
        // SAFETY: `cpumask_next()` on the possible mask only reads it; `self.prev` is -1 or a
        // CPU number below `nr_cpu_ids`.
        let cpu = unsafe { bindings::cpumask_next_possible(self.prev) };
        // `nr_cpu_ids` (or more) ends the iteration.
        let id = CpuId::from_u32(cpu)?;
        self.prev = i32::try_from(cpu).ok()?;
        Some(id)
    }
}

/// Returns an iterator over the possible CPUs (`for_each_possible_cpu()`).
#[inline]
pub fn possible_cpus() -> PossibleCpus {
    PossibleCpus { prev: -1 }
}

/// One `T` per possible CPU.
///
/// # Invariants
///
/// `ptr` was returned by `__alloc_percpu()` for the size and alignment of `T`, and for every
/// possible CPU the slot `per_cpu_ptr(ptr, cpu)` holds an initialised `T` that is pinned until
/// the [`PerCpu`] is dropped.
pub struct PerCpu<T> {
    ptr: NonNull<c_void>,
    _t: PhantomData<T>,
}

// SAFETY: The slots are heap memory owned by the `PerCpu`; moving it to another thread moves the
// `T`s, which `T: Send` allows.
unsafe impl<T: Send> Send for PerCpu<T> {}

// SAFETY: A shared `PerCpu` only hands out shared references to its slots, to any thread, which
// `T: Sync` allows.
unsafe impl<T: Sync> Sync for PerCpu<T> {}

impl<T> PerCpu<T> {
    /// Allocates the per-CPU memory and initialises the slot of every possible CPU with the
    /// initialiser `init(cpu)` returns.
    ///
    /// Must be called from a context that may sleep (`GFP_KERNEL`).
    pub fn new<I, E, F>(mut init: F) -> Result<Self>
    where
        F: FnMut(CpuId) -> I,
        I: PinInit<T, E>,
        Error: From<E>,
    {
        // SAFETY: `__alloc_percpu()` has no preconditions; a zero-sized `T` gets a valid, unique
        // allocation too.
        let raw = unsafe { bindings::__alloc_percpu(size_of::<T>().max(1), align_of::<T>()) };
        let ptr = NonNull::new(raw).ok_or(AllocError)?;

        for cpu in possible_cpus() {
            // SAFETY: `ptr` comes from `__alloc_percpu()` and `cpu` is possible.
            let slot = unsafe { bindings::per_cpu_ptr(ptr.as_ptr(), cpu.as_u32()) }.cast::<T>();
            // SAFETY: `slot` is valid, suitably aligned memory for a `T` that nobody else uses,
            // and it is never moved until it is dropped below or in `Drop`.
            if let Err(e) = unsafe { pin_init::raw_try_init(slot, init(cpu)) } {
                // Drop the slots initialised so far, in the same order.
                for done in possible_cpus().take_while(|c| *c != cpu) {
                    // SAFETY: The slot of every CPU before `cpu` was initialised above.
                    unsafe {
                        core::ptr::drop_in_place(
                            bindings::per_cpu_ptr(ptr.as_ptr(), done.as_u32()).cast::<T>(),
                        )
                    };
                }
                // SAFETY: `ptr` came from `__alloc_percpu()` and nothing references it any more.
                unsafe { bindings::free_percpu(ptr.as_ptr()) };
                return Err(Error::from(e));
            }
        }

        // INVARIANT: The slot of every possible CPU has just been initialised.
        Ok(Self {
            ptr,
            _t: PhantomData,
        })
    }

    /// Returns the slot of `cpu`, or [`None`] if `cpu` is not possible.
    ///
    /// The slot of an offline CPU is still valid.
    #[inline]
    pub fn get(&self, cpu: CpuId) -> Option<Pin<&T>> {
        if !cpu_possible(cpu) {
            return None;
        }
        // SAFETY: By the type invariants, the slot of a possible CPU holds a valid, pinned `T`
        // that lives as long as `self`.
        Some(unsafe { self.slot(cpu) })
    }

    /// Runs `f` on the slot of the current CPU with preemption disabled.
    ///
    /// The CPU cannot change while `f` runs. It need not be online: NMIs, and the code that
    /// brings a CPU up or takes it down, run on CPUs that are not in the online mask; callers
    /// that care check [`cpu_online`]. Callable from any context, NMI included; `f` must not
    /// sleep.
    #[inline]
    pub fn with_local<R>(&self, f: impl FnOnce(CpuId, Pin<&T>) -> R) -> R {
        // SAFETY: `preempt_disable()` may be called from any context; it is undone below.
        unsafe { bindings::preempt_disable() };
        let cpu = CpuId::current();
        // SAFETY: The current CPU is possible, and by the type invariants its slot holds a valid,
        // pinned `T` that lives as long as `self`.
        let ret = f(cpu, unsafe { self.slot(cpu) });
        // SAFETY: Pairs with the `preempt_disable()` above.
        unsafe { bindings::preempt_enable() };
        ret
    }

    /// Returns the slot of `cpu`.
    ///
    /// # Safety
    ///
    /// `cpu` must be possible.
    #[inline]
    unsafe fn slot(&self, cpu: CpuId) -> Pin<&T> {
        // SAFETY: The caller guarantees that `cpu` is possible, and `self.ptr` comes from
        // `__alloc_percpu()`.
        let slot = unsafe { bindings::per_cpu_ptr(self.ptr.as_ptr(), cpu.as_u32()) };
        // SAFETY: By the type invariants, the slot holds a valid `T` pinned until `self` is
        // dropped, which the lifetime of the returned reference cannot outlive.
        unsafe { Pin::new_unchecked(&*slot.cast::<T>()) }
    }
}

impl<T> Drop for PerCpu<T> {
    fn drop(&mut self) {
        for cpu in possible_cpus() {
            // SAFETY: By the type invariants, the slot of every possible CPU holds a valid `T`;
            // we own it and nothing references it any more.
            unsafe {
                core::ptr::drop_in_place(
                    bindings::per_cpu_ptr(self.ptr.as_ptr(), cpu.as_u32()).cast::<T>(),
                )
            };
        }
        // SAFETY: `self.ptr` came from `__alloc_percpu()` and every slot has been dropped.
        unsafe { bindings::free_percpu(self.ptr.as_ptr()) };
    }
}

/// Keeps the current task on its CPU until it is dropped (`migrate_disable()`).
///
/// The task stays preemptible and may sleep, but runs on this CPU only, so that code using
/// `this_cpu_ptr()` without disabling preemption (for example `bpf_mem_free_rcu()`, which a
/// kptr destructor may reach) finds one CPU's data throughout.
///
/// # Invariants
///
/// The current task called `migrate_disable()` when the guard was created and has not undone
/// it; the guard is not `Send`, so it is dropped by the same task.
#[must_use = "migration is enabled again as soon as the guard is dropped"]
pub struct MigrateDisabled(NotThreadSafe);

impl MigrateDisabled {
    /// Disables migration of the current task. Task context only.
    #[inline]
    pub fn new() -> Self {
        // SAFETY: `migrate_disable()` may be called from any task context and nests; it is
        // undone by `Drop`.
        unsafe { bindings::migrate_disable() };
        // INVARIANT: Migration was just disabled by this task.
        Self(NotThreadSafe)
    }
}

impl Default for MigrateDisabled {
    #[inline]
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MigrateDisabled {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: By the type invariants, this task disabled migration in `new()`.
        unsafe { bindings::migrate_enable() };
    }
}
