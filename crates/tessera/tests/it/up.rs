//! A new user's path: `tessera up`, then `tessera status` in another
//! terminal; Ctrl-C stops everything; `up` again reuses the data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use node::status::ClusterStatus;

use crate::harness::{binary, exclusive, free_port, free_ports_at, run_bounded, stacks, which};

fn start_up(data: &std::path::Path, port: u16, iscsi_port: u16) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(binary())
        .args([
            "up",
            "--hosts",
            "3",
            "--base-port",
            &port.to_string(),
            "--iscsi-port",
            &iscsi_port.to_string(),
            "--data",
        ])
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

/// What `tessera up` and the nodes it started are doing.
fn up_stacks(up: &Child) -> String {
    let mut pids = vec![("tessera up".to_string(), up.id())];
    for host in ["host-1", "host-2", "host-3"] {
        pids.extend(node_process(up.id(), host).map(|pid| (host.to_string(), pid)));
    }
    stacks(&pids)
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

/// The pid of the node process `up` (pid `parent`) runs for `host`.
fn node_process(parent: u32, host: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After the command name in parentheses: state, then the parent pid.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest.to_string()) else { continue };
        let ppid = after.split_whitespace().nth(1).and_then(|field| field.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if ppid == Some(parent) && cmdline.contains(&format!("{host}/node.toml")) {
            return Some(pid);
        }
    }
    None
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
    // The node-to-node port and the admin API's, 80 above it.
    let port = free_ports_at(&["127.0.0.1", "127.0.0.2", "127.0.0.3"], &[0, 80]);
    let iscsi_port = free_port(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let (child, lines) = start_up(&data, port, iscsi_port);
    let mut printed = wait_for_line(&lines, "Tessera is up", Duration::from_secs(120));
    assert!(printed.iter().any(|line| line.contains("Created a 3-host cluster")));
    printed.extend(wait_for_line(&lines, "Press Ctrl-C", Duration::from_secs(10)));
    // The default volume's URL works with the tools the README names.
    let url = format!("iscsi://127.0.0.1:{iscsi_port}/iqn.2026-11.org.tessera:vol0/0");
    assert!(printed.iter().any(|line| line.trim() == url), "up printed its URL: {printed:#?}");
    let bounded = |command: &mut Command| run_bounded(command, Duration::from_secs(120), || up_stacks(&child));
    assert!(
        which("iscsi-ls").is_some() && which("qemu-img").is_some(),
        "this test needs iscsi-ls and qemu-img (scripts/test installs them)"
    );
    let listed = bounded(Command::new("iscsi-ls").args(["-s", &format!("iscsi://127.0.0.1:{iscsi_port}")]));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("iqn.2026-11.org.tessera:vol0") && listed.contains("DIRECT_ACCESS"), "{listed}");
    let info = bounded(Command::new("qemu-img").args(["info", &url]));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("virtual size: 1 GiB"), "{info}");
    let first = status(&data);
    assert!(first.healthy, "{first:#?}");
    assert_eq!(first.hosts.len(), 3);
    assert!(first.hosts.iter().all(|host| host.state == "up"));
    assert!(first.log.leader.is_some());
    let human = Command::new(binary()).args(["status", "--data"]).arg(&data).output().unwrap();
    let human = String::from_utf8(human.stdout).unwrap();
    assert!(human.contains("healthy (3 hosts, hierarchy epoch") && human.contains("leader"), "{human}");
    assert!(human.contains("HIERARCHY") && human.contains("root"), "the tree is shown: {human}");

    // What the README suggests trying: kill -9 a node; it is marked down,
    // and `up` starts it again after a while, when it comes back.
    let victim = node_process(child.id(), "host-2").expect("host-2's node process is a child of `up`");
    // SAFETY: kill() on a process `up` (our child) started for this test.
    unsafe {
        libc::kill(victim as libc::pid_t, libc::SIGKILL);
    }
    let killed = Instant::now();
    let host_state = |status: &ClusterStatus| {
        status.hosts.iter().find(|host| host.id == 2).and_then(|host| host.catalog_state.clone())
    };
    let mut down_after = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if host_state(&status(&data)).as_deref() == Some("down") {
            down_after = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let down_after = down_after.expect("host-2 was not marked down within 30 s of kill -9");
    println!("host-2 marked down {down_after:?} after kill -9");
    let mut back = false;
    while killed.elapsed() < Duration::from_secs(90) {
        let now = status(&data);
        if host_state(&now).as_deref() == Some("up") && now.healthy {
            back = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(back, "host-2 did not come back after `up` restarted it");
    println!("host-2 back up {:?} after kill -9 (restarted after 10 s)", killed.elapsed());
    stop(child);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port + 80)).is_err(),
        "a node still listens after `tessera up` stopped"
    );

    let (child, lines) = start_up(&data, port, iscsi_port);
    let printed = wait_for_line(&lines, "Tessera is up", Duration::from_secs(120));
    assert!(printed.iter().any(|line| line.contains("Reusing the cluster")));
    let second = status(&data);
    assert_eq!(second.cluster_id, first.cluster_id, "the same cluster came back");
    assert!(second.healthy, "{second:#?}");
    assert!(second.log.tail >= first.log.tail, "the log kept its entries");
    stop(child);
}
