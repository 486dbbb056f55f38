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

#[cfg(not(unix))]
pub fn read_hidden(_prompt: &str) -> Result<Option<String>, Error> {
    Ok(None)
}
