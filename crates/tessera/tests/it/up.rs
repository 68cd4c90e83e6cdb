//! A new user's path: `tessera up`, then `tessera status` in another
//! terminal; Ctrl-C stops everything; `up` again reuses the data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use node::status::ClusterStatus;

use crate::harness::{binary, exclusive, free_port};

fn start_up(data: &std::path::Path, port: u16) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(binary())
        .args(["up", "--hosts", "3", "--base-port", &port.to_string(), "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    (child, receiver)
}

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            let found = line.contains(needle);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }
    panic!("`tessera up` did not print {needle:?} within {timeout:?}; it printed:\n{}", seen.join("\n"));
}

fn status(data: &std::path::Path) -> ClusterStatus {
    let output = Command::new(binary()).args(["status", "--json", "--data"]).arg(data).output().unwrap();
    assert!(output.status.success(), "tessera status failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn stop(mut child: Child) {
    // SAFETY: kill() on the pid of our own unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "`tessera up` exited with {exit} on SIGTERM");
            return;
        }
        assert!(Instant::now() < deadline, "`tessera up` did not stop within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_then_status_shows_a_healthy_cluster_and_restart_reuses_data() {
    let _exclusive = exclusive();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tessera-data");
    let port = free_port(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let (child, lines) = start_up(&data, port);
    let printed = wait_for_line(&lines, "Tessera is up", Duration::from_secs(120));
    assert!(printed.iter().any(|line| line.contains("Created a 3-host cluster")));
    let first = status(&data);
    assert!(first.healthy, "{first:#?}");
    assert_eq!(first.hosts.len(), 3);
    assert!(first.hosts.iter().all(|host| host.state == "up"));
    assert!(first.log.leader.is_some());
    let human = Command::new(binary()).args(["status", "--data"]).arg(&data).output().unwrap();
    let human = String::from_utf8(human.stdout).unwrap();
    assert!(human.contains("healthy (3 hosts, hierarchy epoch") && human.contains("leader"), "{human}");
    assert!(human.contains("HIERARCHY") && human.contains("root"), "the tree is shown: {human}");
    stop(child);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port + 80)).is_err(),
        "a node still listens after `tessera up` stopped"
    );

    let (child, lines) = start_up(&data, port);
    let printed = wait_for_line(&lines, "Tessera is up", Duration::from_secs(120));
    assert!(printed.iter().any(|line| line.contains("Reusing the cluster")));
    let second = status(&data);
    assert_eq!(second.cluster_id, first.cluster_id, "the same cluster came back");
    assert!(second.healthy);
    assert!(second.log.tail >= first.log.tail, "the log kept its entries");
    stop(child);
}
