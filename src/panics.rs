//! Panics turned into errors: a stage that panics (a division by zero on a bad value, a bug) must
//! fail with its message, not take a worker thread down and leave the run waiting forever.

use std::any::Any;

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String` payload).
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Runs `f`, turning a panic into `Err` with its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| message(&*p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn panics_become_their_message() {
        assert_eq!(super::catch(|| 3), Ok(3));
        let zero = std::hint::black_box(0usize);
        let e = super::catch(|| 10 / zero).unwrap_err();
        assert!(e.contains("divide by zero"), "{e}");
        assert_eq!(
            super::catch(|| -> () { panic!("{} {}", "a", 1) }).unwrap_err(),
            "a 1"
        );
    }
}
