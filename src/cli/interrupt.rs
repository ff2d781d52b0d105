//! Ctrl-C and SIGTERM for the commands that run stages.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// SIGINT and SIGTERM (Slurm's pre-emption signal), taken by one thread. The first sets `flag`: a local run stops starting
/// stages and its running stages see it as their cancel flag (training kinds stop after the
/// step, command stages stop their process group), a Slurm run cancels its jobs; nothing is
/// published, and the run exits 130 (SIGINT) or 143 (SIGTERM). A second signal quits at once.
/// Works by blocking the signals in every thread and waiting for them in one, so no handler and
/// no global state are needed. Install before any other thread starts: threads inherit the mask.
pub struct Interrupt {
    pub flag: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl Interrupt {
    /// `doing` says what the first signal does, for the line printed when it comes.
    pub fn install(doing: &'static str) -> Interrupt {
        let flag = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicI32::new(0));
        // SAFETY: plain libc calls on a sigset_t this function owns.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let (seen, which) = (flag.clone(), signal.clone());
        std::thread::spawn(move || loop {
            let mut got = 0;
            // SAFETY: `set` is initialised and blocked in this thread.
            if unsafe { libc::sigwait(&set, &mut got) } != 0 {
                return;
            }
            if seen.swap(true, Ordering::SeqCst) {
                std::process::exit(128 + got);
            }
            which.store(got, Ordering::SeqCst);
            eprintln!("interrupted: {doing}; nothing unfinished is published");
        });
        Interrupt { flag, signal }
    }

    /// 128 + the signal, once one came.
    pub fn exit_code(&self) -> Option<u8> {
        let signal = self.signal.load(Ordering::SeqCst);
        (self.flag.load(Ordering::SeqCst) && signal > 0).then(|| (128 + signal) as u8)
    }
}
