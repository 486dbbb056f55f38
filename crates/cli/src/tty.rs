//! Asking for a secret on the terminal without echoing it (`keyplane login`).

use keyplane_client::Error;

/// Writes `prompt` to the controlling terminal and reads one line from it with echo off.
/// `None` when the process has no terminal (then the caller asks for `--token-stdin`).
#[cfg(unix)]
pub fn read_hidden(prompt: &str) -> Result<Option<String>, Error> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;

    let Ok(tty) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    else {
        return Ok(None);
    };
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data, filled in by tcgetattr before any field is read.
    let mut original: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor owned by `tty` for the whole call.
    if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
        return Ok(None);
    }
    // Before echo goes off, and (declared before `_restore`) dropped after it is back on: no
    // signal in between leaves the terminal without echo.
    let _signals = signals::RestoreOnSignal::install(fd, original);
    let mut hidden = original;
    hidden.c_lflag &= !libc::ECHO;
    // Still echo the newline, so the next output starts on its own line.
    hidden.c_lflag |= libc::ECHONL;
    let terminal = |e: std::io::Error| Error::Local(format!("cannot use the terminal: {e}"));
    // SAFETY: as above; `hidden` is a valid termios copied from the terminal's own.
    if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &hidden) } != 0 {
        return Err(terminal(std::io::Error::last_os_error()));
    }
    /// Puts echo back however the read ends.
    struct Restore(i32, libc::termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: the descriptor outlives this guard (declared after `tty`).
            unsafe { libc::tcsetattr(self.0, libc::TCSAFLUSH, &self.1) };
        }
    }
    let _restore = Restore(fd, original);
    let mut writer = &tty;
    writer
        .write_all(prompt.as_bytes())
        .and_then(|()| writer.flush())
        .map_err(terminal)?;
    let mut line = String::new();
    BufReader::new(&tty)
        .read_line(&mut line)
        .map_err(terminal)?;
    Ok(Some(line))
}

/// Ctrl-C (or a kill) at the prompt would end the process with echo still off, since no
/// destructor runs: while the prompt waits, those signals put the terminal back first.
#[cfg(unix)]
mod signals {
    use std::sync::atomic::{AtomicPtr, Ordering};

    const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP];

    struct Saved {
        fd: libc::c_int,
        termios: libc::termios,
    }

    /// What the handler restores; set before it is installed, never freed (a handler on another
    /// thread may still be reading it; one prompt per process).
    static SAVED: AtomicPtr<Saved> = AtomicPtr::new(std::ptr::null_mut());

    extern "C" fn restore_then_die(signal: libc::c_int) {
        let saved = SAVED.load(Ordering::SeqCst);
        // SAFETY: only async-signal-safe calls (tcsetattr, write, signal, raise); `saved` is
        // null or a leaked, never-changed `Saved`.
        unsafe {
            if let Some(saved) = saved.as_ref() {
                libc::tcsetattr(saved.fd, libc::TCSANOW, &saved.termios);
                // The shell's prompt then starts on a line of its own.
                libc::write(saved.fd, b"\n".as_ptr().cast(), 1);
            }
            // Dies of the same signal, as it would have without this handler.
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }

    /// The handlers replaced, put back when dropped.
    pub struct RestoreOnSignal(Vec<(libc::c_int, libc::sigaction)>);

    impl RestoreOnSignal {
        pub fn install(fd: libc::c_int, termios: libc::termios) -> Self {
            let saved = Box::into_raw(Box::new(Saved { fd, termios }));
            SAVED.store(saved, Ordering::SeqCst);
            let mut replaced = Vec::new();
            for signal in SIGNALS {
                // SAFETY: sigaction structs are plain data, filled in by sigaction or here.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    // An ignored signal (nohup) stays ignored: it ends nothing.
                    if libc::sigaction(signal, std::ptr::null(), &mut old) != 0
                        || old.sa_sigaction == libc::SIG_IGN
                    {
                        continue;
                    }
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = restore_then_die as extern "C" fn(libc::c_int) as usize;
                    libc::sigemptyset(&mut action.sa_mask);
                    if libc::sigaction(signal, &action, std::ptr::null_mut()) == 0 {
                        replaced.push((signal, old));
                    }
                }
            }
            Self(replaced)
        }
    }

    impl Drop for RestoreOnSignal {
        fn drop(&mut self) {
            for (signal, old) in &self.0 {
                // SAFETY: `old` is what sigaction returned for this signal.
                unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
            }
            SAVED.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

#[cfg(not(unix))]
pub fn read_hidden(_prompt: &str) -> Result<Option<String>, Error> {
    Ok(None)
}
