// SPDX-License-Identifier: GPL-2.0

//! Tasks Trace RCU: RCU whose readers may sleep, used by sleepable BPF programs.
//!
//! Readers hold a [`Guard`] from [`read_lock`] (`rcu_read_lock_trace()`) and may block while they
//! hold it. [`synchronize_rcu_tasks_trace`] waits for the readers that exist when it is called;
//! an [`RcuHead`] embedded in an object queues a callback on that object after such a grace
//! period (`call_rcu_tasks_trace()`); [`rcu_barrier_tasks_trace`] waits for the callbacks queued
//! before it.
//!
//! A Tasks Trace grace period implies a regular RCU grace period, so a callback may free memory
//! that regular RCU readers could also see.
//!
//! In this kernel Tasks Trace RCU is implemented with SRCU (`rcu_tasks_trace_srcu_struct`):
//! queueing a callback is `call_srcu()`, legal with interrupts disabled and under raw spinlocks
//! but **not in NMI**, and callbacks run from a workqueue with bottom halves disabled.
//!
//! C header: [`include/linux/rcupdate_trace.h`](srctree/include/linux/rcupdate_trace.h)

use crate::{
    bindings,
    types::{
        NotThreadSafe,
        Opaque, //
    },
};
use core::marker::PhantomData;

/// Evidence that a Tasks Trace RCU read-side critical section is held by the current task.
///
/// The holder may sleep. The type is not `Send`: the section belongs to the task.
///
/// # Invariants
///
/// The current task is in a Tasks Trace RCU read-side critical section for as long as the guard
/// exists.
#[must_use = "the read-side critical section ends when the guard is dropped"]
pub struct Guard(NotThreadSafe);

impl Guard {
    /// Enters a Tasks Trace RCU read-side critical section (`rcu_read_lock_trace()`).
    #[inline]
    pub fn new() -> Self {
        // SAFETY: `rcu_read_lock_trace()` may be called from any task context and nests.
        unsafe { bindings::rcu_read_lock_trace() };
        // INVARIANT: The critical section was just entered.
        Self(NotThreadSafe)
    }

    /// Explicitly leaves the read-side critical section.
    #[inline]
    pub fn unlock(self) {}
}

impl Default for Guard {
    #[inline]
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: By the type invariants, the current task is in a critical section that this
        // guard entered.
        unsafe { bindings::rcu_read_unlock_trace() };
    }
}

/// Enters a Tasks Trace RCU read-side critical section.
#[inline]
pub fn read_lock() -> Guard {
    Guard::new()
}

/// Waits for a full Tasks Trace RCU grace period (`synchronize_rcu_tasks_trace()`).
///
/// Every read-side critical section that exists when this is called has ended when it returns.
/// Must be called from a context that may sleep.
#[inline]
pub fn synchronize_rcu_tasks_trace() {
    // SAFETY: `synchronize_rcu_tasks_trace()` may be called from any sleepable context.
    unsafe { bindings::synchronize_rcu_tasks_trace() };
}

/// Waits for the Tasks Trace RCU callbacks queued before the call (`rcu_barrier_tasks_trace()`).
///
/// It does not wait for callbacks queued after it started, including those queued by the
/// callbacks it waits for, and it may return at once when none is queued. Must be called from a
/// context that may sleep.
#[inline]
pub fn rcu_barrier_tasks_trace() {
    // SAFETY: `rcu_barrier_tasks_trace()` may be called from any sleepable context.
    unsafe { bindings::rcu_barrier_tasks_trace() };
}

/// Code run by an [`RcuHead`] embedded in `Self` after a Tasks Trace RCU grace period.
///
/// `Sync`: the callback gets a shared reference on whichever CPU runs it, while other CPUs may
/// hold shared references to the same object.
pub trait RcuTasksTraceCallback: Sync {
    /// Called after the grace period, from a workqueue with bottom halves disabled, on any CPU.
    ///
    /// It must not sleep. It may queue the same [`RcuHead`] again.
    fn run(this: &Self);
}

/// Declares that a type embeds an [`RcuHead`] and how to get from one to the other.
///
/// Use [`impl_has_rcu_head!`] to implement it.
///
/// # Safety
///
/// [`HasRcuHead::raw_get_rcu_head`] must return a pointer to an [`RcuHead<Self>`] field of the
/// object, and [`HasRcuHead::rcu_head_container_of`] must be its exact inverse.
pub unsafe trait HasRcuHead: RcuTasksTraceCallback + Sized {
    /// Returns a pointer to the [`RcuHead`] embedded in `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid object of type `Self`.
    unsafe fn raw_get_rcu_head(ptr: *mut Self) -> *mut RcuHead<Self>;

    /// Returns a pointer to the object that contains the [`RcuHead`] `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to the [`RcuHead`] field of a valid object of type `Self`.
    unsafe fn rcu_head_container_of(ptr: *mut RcuHead<Self>) -> *mut Self;
}

/// Implements [`HasRcuHead`] for a struct with an [`RcuHead`] field.
///
/// # Examples
///
/// ```
/// use kernel::sync::rcu_tasks_trace::{impl_has_rcu_head, RcuHead, RcuTasksTraceCallback};
///
/// struct Deferred {
///     rcu: RcuHead<Deferred>,
/// }
///
/// impl RcuTasksTraceCallback for Deferred {
///     fn run(_this: &Self) {}
/// }
///
/// impl_has_rcu_head! {
///     impl HasRcuHead for Deferred { self.rcu }
/// }
/// ```
#[macro_export]
macro_rules! impl_has_rcu_head {
    ($(impl$({$($generics:tt)*})? HasRcuHead for $self:ty { self.$field:ident })*) => {$(
        // SAFETY: `raw_get_rcu_head` returns the address of the `$field` field, which only
        // compiles if that field is an `RcuHead<Self>`, and `rcu_head_container_of` is its
        // inverse.
        unsafe impl$(<$($generics)+>)? $crate::sync::rcu_tasks_trace::HasRcuHead for $self {
            #[inline]
            unsafe fn raw_get_rcu_head(
                ptr: *mut Self,
            ) -> *mut $crate::sync::rcu_tasks_trace::RcuHead<Self> {
                // SAFETY: The caller promises that `ptr` points to a valid `Self`.
                unsafe { ::core::ptr::addr_of_mut!((*ptr).$field) }
            }

            #[inline]
            unsafe fn rcu_head_container_of(
                ptr: *mut $crate::sync::rcu_tasks_trace::RcuHead<Self>,
            ) -> *mut Self {
                // SAFETY: The caller promises that `ptr` points to the `$field` field of a
                // `Self`.
                unsafe { $crate::container_of!(ptr, Self, $field) }
            }
        }
    )*};
}
pub use impl_has_rcu_head;

/// A `struct rcu_head` embedded in a `T`, whose callback is `T`'s [`RcuTasksTraceCallback::run`].
///
/// An `rcu_head` needs no initialisation; it is written by `call_rcu_tasks_trace()`.
#[repr(transparent)]
pub struct RcuHead<T> {
    head: Opaque<bindings::callback_head>,
    _t: PhantomData<T>,
}

// SAFETY: A `struct rcu_head` may be queued from one CPU and invoked on another.
unsafe impl<T> Send for RcuHead<T> {}

// SAFETY: A shared reference only allows `call_rcu_tasks_trace()`, whose callers must guarantee
// exclusive use of the head until the callback runs (see `RcuHead::call_rcu_tasks_trace`).
unsafe impl<T> Sync for RcuHead<T> {}

impl<T> RcuHead<T> {
    /// Creates an `rcu_head` that is not queued.
    #[inline]
    pub const fn new() -> Self {
        Self {
            head: Opaque::uninit(),
            _t: PhantomData,
        }
    }
}

impl<T: HasRcuHead> RcuHead<T> {
    /// Queues `T`'s callback to run after a Tasks Trace RCU grace period
    /// (`call_rcu_tasks_trace()`).
    ///
    /// The grace period starts after this call: every read-side critical section that exists
    /// now has ended before the callback runs. May be called with interrupts disabled and under
    /// raw spinlocks, but **not from NMI**.
    ///
    /// # Safety
    ///
    /// - `self` must be embedded in a valid `T` that stays valid, and is not moved, until the
    ///   callback has returned.
    /// - The head must not be queued already: it is reusable once its callback has started.
    #[inline]
    pub unsafe fn call_rcu_tasks_trace(&self) {
        // SAFETY: The caller guarantees that the head is unused and its container outlives the
        // callback.
        unsafe { bindings::call_rcu_tasks_trace(self.head.get(), Some(Self::run_callback)) };
    }

    /// The C callback: finds the container and calls its handler.
    ///
    /// # Safety
    ///
    /// `ptr` must be the `head` field of an [`RcuHead<T>`] embedded in a valid `T`.
    unsafe extern "C" fn run_callback(ptr: *mut bindings::callback_head) {
        // `RcuHead<T>` is `repr(transparent)` over `Opaque<bindings::callback_head>`.
        let head = ptr.cast::<RcuHead<T>>();
        // SAFETY: By the safety requirements of `call_rcu_tasks_trace`, `head` is embedded in a
        // valid `T`.
        let this = unsafe { &*T::rcu_head_container_of(head) };
        T::run(this);
    }
}

impl<T> Default for RcuHead<T> {
    fn default() -> Self {
        Self::new()
    }
}
