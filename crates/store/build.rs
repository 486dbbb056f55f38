// `sqlx::migrate!` embeds the migration files at compile time, and cargo does not know it reads
// them: a migration added, renamed or edited must rebuild the crate, or the binary embeds the old
// set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
