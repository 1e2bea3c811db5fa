// SPDX-License-Identifier: GPL-2.0

//! Work run in hard interrupt context, queued from any context, NMI included.
//!
//! An [`IrqWork`] is embedded in the object it works on (named through [`HasIrqWork`]); its
//! callback is [`IrqWorkHandler::run`], called with a reference to that object on the CPU that
//! queued it. Queueing is NMI-safe: it is how NMI code defers what it may not do itself.
//!
//! C header: [`include/linux/irq_work.h`](srctree/include/linux/irq_work.h)

use crate::{
    bindings,
    prelude::*,
    types::Opaque, //
};
use core::marker::PhantomData;

/// Code run by an [`IrqWork`] embedded in `Self`.
///
/// `Sync`: the handler gets a shared reference on the CPU that queued the work, while other
/// CPUs may hold shared references to the same object.
pub trait IrqWorkHandler: Sync {
    /// Called in hard interrupt context, interrupts disabled, on the CPU that queued the work.
    ///
    /// With [`IrqWork::new_hard`], this holds even on `PREEMPT_RT`. It must not sleep.
    fn run(this: &Self);
}

/// Declares that a type embeds an [`IrqWork`] and how to get from one to the other.
///
/// Use [`impl_has_irq_work!`] to implement it.
///
/// # Safety
///
/// [`HasIrqWork::raw_get_irq_work`] must return a pointer to an [`IrqWork<Self>`] field of the
/// object, and [`HasIrqWork::irq_work_container_of`] must be its exact inverse.
pub unsafe trait HasIrqWork: IrqWorkHandler + Sized {
    /// Returns a pointer to the [`IrqWork`] embedded in `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid object of type `Self`.
    unsafe fn raw_get_irq_work(ptr: *mut Self) -> *mut IrqWork<Self>;

    /// Returns a pointer to the object that contains the [`IrqWork`] `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to the [`IrqWork`] field of a valid object of type `Self`.
    unsafe fn irq_work_container_of(ptr: *mut IrqWork<Self>) -> *mut Self;
}

/// Implements [`HasIrqWork`] for a struct with an [`IrqWork`] field.
///
/// # Examples
///
/// ```
/// use kernel::irq_work::{impl_has_irq_work, IrqWork, IrqWorkHandler};
///
/// #[pin_data]
/// struct Kicker {
///     #[pin]
///     work: IrqWork<Kicker>,
/// }
///
/// impl IrqWorkHandler for Kicker {
///     fn run(_this: &Self) {}
/// }
///
/// impl_has_irq_work! {
///     impl HasIrqWork for Kicker { self.work }
/// }
/// ```
#[macro_export]
macro_rules! impl_has_irq_work {
    ($(impl$({$($generics:tt)*})? HasIrqWork for $self:ty { self.$field:ident })*) => {$(
        // SAFETY: `raw_get_irq_work` returns the address of the `$field` field, which only
        // compiles if that field is an `IrqWork<Self>`, and `irq_work_container_of` is its
        // inverse.
        unsafe impl$(<$($generics)+>)? $crate::irq_work::HasIrqWork for $self {
            #[inline]
            unsafe fn raw_get_irq_work(ptr: *mut Self) -> *mut $crate::irq_work::IrqWork<Self> {
                // SAFETY: The caller promises that `ptr` points to a valid `Self`.
                unsafe { ::core::ptr::addr_of_mut!((*ptr).$field) }
            }

            #[inline]
            unsafe fn irq_work_container_of(
                ptr: *mut $crate::irq_work::IrqWork<Self>,
            ) -> *mut Self {
                // SAFETY: The caller promises that `ptr` points to the `$field` field of a
                // `Self`.
                unsafe { $crate::container_of!(ptr, Self, $field) }
            }
        }
    )*};
}
pub use impl_has_irq_work;

/// An irq_work item embedded in a `T`, whose callback is `T`'s [`IrqWorkHandler::run`].
///
/// Wraps the kernel's `struct irq_work`.
///
/// Dropping an [`IrqWork`] does not wait for its callback: whoever queues it promises (see
/// [`IrqWork::queue`]) that `T` outlives the callback, typically by calling [`IrqWork::sync`]
/// before `T` goes away.
///
/// # Invariants
///
/// `work` is a `struct irq_work` initialised with [`IrqWork::run_callback`] as its function, and
/// it is pinned.
#[repr(transparent)]
#[pin_data]
pub struct IrqWork<T> {
    #[pin]
    work: Opaque<bindings::irq_work>,
    _t: PhantomData<T>,
}

// SAFETY: A `struct irq_work` may be queued, synced and run from any CPU.
unsafe impl<T> Send for IrqWork<T> {}

// SAFETY: Every operation through a shared reference (`irq_work_queue()`, `irq_work_sync()`,
// `irq_work_is_busy()`) is designed for concurrent use.
unsafe impl<T> Sync for IrqWork<T> {}

impl<T: HasIrqWork> IrqWork<T> {
    /// Creates a work item that runs in hard interrupt context on `PREEMPT_RT` too
    /// (`IRQ_WORK_INIT_HARD()`).
    #[inline]
    pub fn new_hard() -> impl PinInit<Self> {
        pin_init!(Self {
            // INVARIANT: The work is initialised with `run_callback`, and `pin_init!` pins it.
            work <- Opaque::ffi_init(|slot: *mut bindings::irq_work| {
                // SAFETY: `slot` is valid for writing a `struct irq_work`.
                unsafe { bindings::init_irq_work_hard(slot, Some(Self::run_callback)) }
            }),
            _t: PhantomData,
        })
    }

    /// Queues the work on the current CPU unless it is already pending (`irq_work_queue()`).
    ///
    /// Returns `false` if it was already pending; its callback then has yet to start and will
    /// observe everything this CPU did before the call. Callable from any context, NMI
    /// included.
    ///
    /// # Safety
    ///
    /// `self` must be embedded in a valid `T` that stays valid until the callback has run, e.g.
    /// because the owner calls [`IrqWork::sync`] before dropping or freeing it.
    #[inline]
    pub unsafe fn queue(&self) -> bool {
        // SAFETY: By the type invariants, `work` is an initialised, pinned `struct irq_work`; the
        // caller keeps its container alive until the callback has run.
        unsafe { bindings::irq_work_queue(self.work.get()) }
    }

    /// Waits until the work is neither pending nor running (`irq_work_sync()`).
    ///
    /// Must be called with interrupts enabled, from a context that may sleep. The work must not
    /// be pending on a CPU that went offline, or this never returns.
    #[inline]
    pub fn sync(&self) {
        // SAFETY: By the type invariants, `work` is an initialised `struct irq_work`.
        unsafe { bindings::irq_work_sync(self.work.get()) }
    }

    /// Returns `true` if the work is pending or running (`irq_work_is_busy()`).
    #[inline]
    pub fn is_busy(&self) -> bool {
        // SAFETY: By the type invariants, `work` is an initialised `struct irq_work`.
        unsafe { bindings::irq_work_is_busy(self.work.get()) }
    }

    /// The C callback: finds the container and calls its handler.
    ///
    /// # Safety
    ///
    /// `ptr` must be the `work` field of an [`IrqWork<T>`] embedded in a valid `T`.
    unsafe extern "C" fn run_callback(ptr: *mut bindings::irq_work) {
        // `IrqWork<T>` is `repr(transparent)` over `Opaque<bindings::irq_work>`.
        let work = ptr.cast::<IrqWork<T>>();
        // SAFETY: By the safety requirements of `queue`, `work` is embedded in a valid `T`.
        let this = unsafe { &*T::irq_work_container_of(work) };
        T::run(this);
    }
}
