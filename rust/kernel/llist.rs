// SPDX-License-Identifier: GPL-2.0

//! Lock-less NULL terminated singly linked lists.
//!
//! Any number of producers may [`LListHead::add`] items while any number of consumers take the
//! whole list with [`LListHead::del_all`], without a lock and from any context, NMI included, on
//! architectures with an NMI-safe `cmpxchg` (`CONFIG_ARCH_HAVE_NMI_SAFE_CMPXCHG`).
//!
//! Items are intrusive: each one embeds an [`LListNode`] and names it through [`HasLListNode`].
//! The list owns the items added to it; [`LListHead::del_all`] hands them back as an owned
//! [`LListBatch`], which yields each item only after it has read the item's link, so the item may
//! be reused or freed as soon as it is yielded (like `llist_for_each_safe()`).
//!
//! C header: [`include/linux/llist.h`](srctree/include/linux/llist.h)

use crate::{
    bindings,
    types::Opaque, //
};
use core::{
    marker::PhantomData,
    ptr::{
        self,
        NonNull, //
    },
};

/// A node of a lock-less list, embedded in the items of an [`LListHead`].
///
/// Wraps the kernel's `struct llist_node`.
///
/// # Invariants
///
/// While the node is on an [`LListHead`] or in an [`LListBatch`], its `next` field is owned by
/// that list: nobody else reads or writes it.
#[repr(transparent)]
pub struct LListNode {
    inner: Opaque<bindings::llist_node>,
}

// SAFETY: A node is a plain link; the list it is on serialises the accesses to it.
unsafe impl Send for LListNode {}

// SAFETY: Shared references to a node allow no access to it; only the list it is on touches it.
unsafe impl Sync for LListNode {}

impl LListNode {
    /// Creates a node that is not on any list.
    #[inline]
    pub const fn new() -> Self {
        Self {
            inner: Opaque::new(bindings::llist_node {
                next: ptr::null_mut(),
            }),
        }
    }

    /// Returns the raw `struct llist_node` pointer of a node pointer.
    #[inline]
    pub const fn raw(this: *mut Self) -> *mut bindings::llist_node {
        Opaque::cast_into(this.cast_const().cast())
    }

    /// Returns a node pointer from a raw `struct llist_node` pointer.
    ///
    /// This is a cast: it does not dereference `ptr`.
    #[inline]
    pub const fn from_raw(ptr: *mut bindings::llist_node) -> *mut Self {
        // `LListNode` is `repr(transparent)` over `Opaque<bindings::llist_node>`, which has the
        // layout of `bindings::llist_node`.
        ptr.cast()
    }
}

impl Default for LListNode {
    fn default() -> Self {
        Self::new()
    }
}

/// Declares that a type embeds an [`LListNode`] and how to get from one to the other.
///
/// Use [`impl_has_llist_node!`] for a Rust struct with an [`LListNode`] field, and
/// [`impl_has_llist_node_c!`] for a `#[repr(transparent)]` wrapper of a C struct with an embedded
/// `struct llist_node` (possibly inside an anonymous union).
///
/// # Safety
///
/// [`HasLListNode::raw_get_llist_node`] must return a pointer to a node inside the object that
/// stays valid as long as the object, is used by no other code while the object is on a list,
/// and [`HasLListNode::llist_node_container_of`] must be its exact inverse.
pub unsafe trait HasLListNode {
    /// Returns a pointer to the [`LListNode`] embedded in `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to a valid object of type `Self`.
    unsafe fn raw_get_llist_node(ptr: *mut Self) -> *mut LListNode;

    /// Returns a pointer to the object that contains the node `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr` must point to the [`LListNode`] of a valid object of type `Self`.
    unsafe fn llist_node_container_of(ptr: *mut LListNode) -> *mut Self;
}

/// Implements [`HasLListNode`] for a struct with an [`LListNode`] field.
///
/// # Examples
///
/// ```
/// use kernel::llist::{impl_has_llist_node, LListNode};
///
/// struct Item {
///     node: LListNode,
/// }
///
/// impl_has_llist_node! {
///     impl HasLListNode for Item { self.node }
/// }
/// ```
#[macro_export]
macro_rules! impl_has_llist_node {
    ($(impl$({$($generics:tt)*})? HasLListNode for $self:ty { self.$field:ident })*) => {$(
        // SAFETY: `raw_get_llist_node` returns the address of the `$field` field, which only
        // compiles if that field is an `LListNode`, and `llist_node_container_of` is its inverse.
        unsafe impl$(<$($generics)+>)? $crate::llist::HasLListNode for $self {
            #[inline]
            unsafe fn raw_get_llist_node(ptr: *mut Self) -> *mut $crate::llist::LListNode {
                // SAFETY: The caller promises that `ptr` points to a valid `Self`.
                unsafe { ::core::ptr::addr_of_mut!((*ptr).$field) }
            }

            #[inline]
            unsafe fn llist_node_container_of(
                ptr: *mut $crate::llist::LListNode,
            ) -> *mut Self {
                // SAFETY: The caller promises that `ptr` points to the `$field` field of a `Self`.
                unsafe { $crate::container_of!(ptr, Self, $field) }
            }
        }
    )*};
}
pub use impl_has_llist_node;

/// Implements [`HasLListNode`] for a `#[repr(transparent)]` wrapper of a C struct whose
/// `struct llist_node` is the (possibly nested) field `self.a.b`: a member of an anonymous union,
/// for instance, which bindgen names `__bindgen_anon_1`.
///
/// The invocation says `unsafe impl`: the macro checks that the field is a `struct llist_node` and
/// that the wrapper has the C struct's size, but only its caller can promise that the wrapper is
/// `#[repr(transparent)]` over the C struct and that, while an object is on a list, no other code
/// uses the node or, for a union member, any other member of its union.
///
/// # Examples
///
/// ```
/// use kernel::{bindings, llist::impl_has_llist_node_c, types::Opaque};
///
/// #[repr(transparent)]
/// struct Work(Opaque<bindings::irq_work>);
///
/// // SAFETY: `Work` is `repr(transparent)` over `struct irq_work`, whose `node.llist` nobody
/// // else uses while the item is on our list.
/// impl_has_llist_node_c! {
///     unsafe impl HasLListNode for Work as bindings::irq_work { self.node.llist }
/// }
/// ```
#[macro_export]
macro_rules! impl_has_llist_node_c {
    (unsafe impl HasLListNode for $self:ty as $c:ty { self.$($field:ident).+ }) => {
        const _: () = ::core::assert!(
            ::core::mem::size_of::<$self>() == ::core::mem::size_of::<$c>()
        );

        // SAFETY: The invocation promises that `$self` is `repr(transparent)` over `$c` and that
        // the node is used by nobody else while the object is on a list; `raw_get_llist_node`
        // returns the address of the node, which only compiles if it is a `struct llist_node`,
        // and `llist_node_container_of` subtracts the node's offset again.
        unsafe impl $crate::llist::HasLListNode for $self {
            #[inline]
            unsafe fn raw_get_llist_node(ptr: *mut Self) -> *mut $crate::llist::LListNode {
                let c = ptr.cast::<$c>();
                // SAFETY: The caller promises that `ptr` points to a valid `Self`, that is a
                // valid `$c`.
                $crate::llist::LListNode::from_raw(unsafe { &raw mut (*c).$($field).+ })
            }

            #[inline]
            unsafe fn llist_node_container_of(
                ptr: *mut $crate::llist::LListNode,
            ) -> *mut Self {
                let offset = ::core::mem::offset_of!($c, $($field).+);
                // SAFETY: The caller promises that `ptr` is the node of a valid `Self`, which
                // starts `offset` bytes before it.
                unsafe { ptr.byte_sub(offset) }.cast()
            }
        }
    };
}
pub use impl_has_llist_node_c;

/// The head of a lock-less list of `T`.
///
/// Wraps the kernel's `struct llist_head`. The head holds no self-reference: it can be moved
/// whenever nobody can reach it.
///
/// # Invariants
///
/// `inner.first` is null or the first node of a NULL terminated chain of [`LListNode`]s, each
/// embedded (per [`HasLListNode`]) in a distinct, valid `T` that the list owns.
#[repr(transparent)]
pub struct LListHead<T: HasLListNode> {
    inner: Opaque<bindings::llist_head>,
    _t: PhantomData<T>,
}

// SAFETY: The list owns its items and hands them to whoever takes them, on any CPU; so it can be
// sent to another thread when the items can.
unsafe impl<T: HasLListNode + Send> Send for LListHead<T> {}

// SAFETY: All operations through a shared reference are atomic (`llist_add()`,
// `llist_del_all()`, `llist_empty()`), and they move items between threads, which `T: Send`
// allows.
unsafe impl<T: HasLListNode + Send> Sync for LListHead<T> {}

impl<T: HasLListNode> LListHead<T> {
    /// Creates an empty list.
    #[inline]
    pub const fn new() -> Self {
        // INVARIANT: A null `first` is the empty list.
        Self {
            inner: Opaque::new(bindings::llist_head {
                first: ptr::null_mut(),
            }),
            _t: PhantomData,
        }
    }

    /// Adds `item` at the head of the list; returns `true` if the list was empty before.
    ///
    /// Lock-less and callable from any context, NMI included (`llist_add()`). The return value
    /// tells the one producer that made the list non-empty that it has to notify the consumer.
    ///
    /// # Safety
    ///
    /// - `item` must point to a valid `T` whose node is on no list.
    /// - Ownership of `item` passes to the list: the caller must not use or free it until it is
    ///   handed back by [`LListHead::del_all`].
    #[inline]
    pub unsafe fn add(&self, item: NonNull<T>) -> bool {
        // SAFETY: The caller guarantees that `item` is valid.
        let node = unsafe { T::raw_get_llist_node(item.as_ptr()) };
        // INVARIANT: The caller passes ownership of a valid item whose node is free.
        // SAFETY: `node` is a valid, unused `llist_node` and `self.inner` a valid `llist_head`.
        unsafe { bindings::llist_add(LListNode::raw(node), self.inner.get()) }
    }

    /// Takes every item off the list, newest first.
    ///
    /// Lock-less and callable from any context, NMI included (`llist_del_all()`). This is a
    /// fully ordered atomic exchange: accesses before it are ordered before the take and accesses
    /// after it after the take.
    #[inline]
    pub fn del_all(&self) -> LListBatch<T> {
        // SAFETY: `self.inner` is a valid `llist_head`.
        let first = unsafe { bindings::llist_del_all(self.inner.get()) };
        // INVARIANT: By the type invariants, `first` is a chain of owned items that the exchange
        // just removed from the shared list; nobody else can reach them now.
        LListBatch {
            first,
            _t: PhantomData,
        }
    }

    /// Returns `true` if the list is empty (`llist_empty()`).
    ///
    /// The answer may be stale by the time it is used unless the caller orders it, e.g. after a
    /// full barrier.
    #[inline]
    pub fn is_empty(&self) -> bool {
        // SAFETY: `self.inner` is a valid `llist_head`.
        unsafe { bindings::llist_empty(self.inner.get()) }
    }
}

impl<T: HasLListNode> Default for LListHead<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A chain of items taken off an [`LListHead`], owned by whoever holds it.
///
/// Iterating the batch hands the items out one by one: the link of an item is read before the
/// item is yielded, so the caller may reuse the node (and free the item) right away.
///
/// Items still in a batch when it is dropped are leaked: the batch does not know how to free a
/// `T`. Drain it before dropping it.
///
/// # Invariants
///
/// `first` is null or the first node of a NULL terminated chain of [`LListNode`]s, each embedded
/// in a distinct, valid `T` owned by the batch. No other code reads or writes these nodes.
#[must_use = "the items of a batch are leaked if it is dropped without draining it"]
pub struct LListBatch<T: HasLListNode> {
    first: *mut bindings::llist_node,
    _t: PhantomData<T>,
}

// SAFETY: The batch owns its items; moving it to another thread moves the items, which `T: Send`
// allows.
unsafe impl<T: HasLListNode + Send> Send for LListBatch<T> {}

impl<T: HasLListNode> LListBatch<T> {
    /// Creates an empty batch.
    #[inline]
    pub const fn new() -> Self {
        // INVARIANT: A null `first` is the empty chain.
        Self {
            first: ptr::null_mut(),
            _t: PhantomData,
        }
    }

    /// Returns `true` if the batch holds no item.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.first.is_null()
    }

    /// Moves every item of `other` to the front of `self`, keeping their order.
    ///
    /// This walks `other` to find its last node.
    pub fn append(&mut self, mut other: LListBatch<T>) {
        if other.first.is_null() {
            return;
        }
        let mut last = other.first;
        // SAFETY: By the type invariants, the nodes of `other` form a valid NULL terminated
        // chain that `other` owns, so their links may be read and the last one written.
        unsafe {
            while !(*last).next.is_null() {
                last = (*last).next;
            }
            (*last).next = self.first;
        }
        // INVARIANT: `self` now owns both chains, linked into one; `other` is left empty.
        self.first = core::mem::replace(&mut other.first, ptr::null_mut());
    }
}

impl<T: HasLListNode> Default for LListBatch<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: HasLListNode> Iterator for LListBatch<T> {
    type Item = NonNull<T>;

    /// Hands out the next item, after having read its link.
    #[inline]
    fn next(&mut self) -> Option<NonNull<T>> {
        let node = self.first;
        if node.is_null() {
            return None;
        }
        // SAFETY: By the type invariants, `node` is a valid node owned by the batch. Reading its
        // link before yielding the item is what lets the caller reuse the node at once.
        self.first = unsafe { (*node).next };
        // SAFETY: By the type invariants, `node` is the node of a valid `T`.
        let item = unsafe { T::llist_node_container_of(LListNode::from_raw(node)) };
        // INVARIANT: The item leaves the chain; its ownership passes to the caller.
        NonNull::new(item)
    }
}
