using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using AnyPrecML.Models;
using AnyPrecML.Orleans;
using AnyPrecML.Quantization;
using Orleans.Hosting;
using Orleans.TestingHost;

namespace AnyPrecML.Tests;

/// <summary>
/// Issue 18: batch scoring on an Orleans cluster writes the bytes `anyprec score` writes, rows in input order, through
/// silo failures and resubmissions. The reference is the single-machine `score` command on the same file.
/// </summary>
[TestClass]
public sealed class ClusterScoringTests
{
    private static TestData.TempDir _dir = null!;
    private const string Model = "s260";

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        AnyPrecisionQuantizer.Quantize(source, Path.Combine(_dir["models"], Model), new UniformSensitivity(), new QuantizerOptions());
        // 38 rows of story text at several offsets, an empty row and a row without the text property (rejected).
        var lines = File.ReadLines(TestData.TinyStories).Where(l => l.Length > 0).ToList();
        var texts = Enumerable.Range(0, 38).Select(i => { var l = lines[i % lines.Count]; int start = Math.Min(i / lines.Count * 90, l.Length / 2); return l.Substring(start, Math.Min(110, l.Length - start)); }).ToList();
        var records = texts.Select(t => JsonSerializer.Serialize(new { text = t })).ToList();
        records.Insert(7, JsonSerializer.Serialize(new { text = "" }));
        records.Insert(19, "{\"id\": 19}");
        File.WriteAllLines(_dir["in.jsonl"], records);
        foreach (int bits in new[] { 3, 4 })
        {
            var (code, _, err) = Cli.Run("score", "--model", Path.Combine(_dir["models"], Model), "--input", _dir["in.jsonl"], "--bits", $"{bits}", "--output", _dir[$"score{bits}.jsonl"]);
            Assert.AreEqual(0, code, err);
        }
    }

    [ClassCleanup]
    public static void Cleanup() => _dir.Dispose();

    private static ScoringJobSpec Spec(string output, int bits, int shardRows) =>
        new() { Input = _dir["in.jsonl"], Output = _dir[output], Model = Model, Bits = bits, ShardRows = shardRows };

    /// <summary>The cluster's output and errors file are byte for byte those of `score`.</summary>
    private static void AssertSameAsScore(string output, int bits)
    {
        CollectionAssert.AreEqual(File.ReadAllBytes(_dir[$"score{bits}.jsonl"]), File.ReadAllBytes(_dir[output]), $"{output}: not the bytes `score --bits {bits}` wrote");
        CollectionAssert.AreEqual(File.ReadAllBytes(_dir[$"score{bits}.jsonl.errors.jsonl"]), File.ReadAllBytes(_dir[output + ".errors.jsonl"]), "errors file");
        Assert.IsFalse(Directory.Exists(_dir[output + ".shards"]), "shard files are removed once the output is written");
    }

    [TestMethod]
    [Timeout(180_000, CooperativeCancellation = true)]
    public async Task ThreeSiloClusterScoresLikeScoreAndSurvivesAKilledSilo()
    {
        var builder = new InProcessTestClusterBuilder(3);
        builder.ConfigureSilo((_, silo) => silo.AddAnyPrecisionScoring(_dir["models"]).AddMemoryGrainStorage(ScoringCluster.StorageName));
        using var cluster = builder.Build();
        await cluster.DeployAsync();
        try
        {
            // Every silo takes shards; the output is the shards in input order.
            var p = await ScoringJobClient.RunAsync(cluster.Client, Spec("c4.jsonl", 4, shardRows: 4));
            Assert.AreEqual(ScoringJobStatus.Complete, p.Status, p.Error);
            Assert.AreEqual(10, p.Shards);
            Assert.AreEqual(3, p.Silos, "each of the 3 silos scored shards");
            AssertSameAsScore("c4.jsonl", 4);

            // A resubmitted finished job scores nothing; one with other settings is refused.
            var again = await ScoringJobClient.RunAsync(cluster.Client, Spec("c4.jsonl", 4, shardRows: 4));
            Assert.AreEqual((0, 10), (again.ShardsScoredNow, again.ShardsAlreadyDone));
            var refused = await Assert.ThrowsAsync<ArgumentException>(() => ScoringJobClient.RunAsync(cluster.Client, Spec("c4.jsonl", 3, shardRows: 4)));
            StringAssert.Contains(refused.Message, "--bits 4");

            // Kill a silo (not the primary, which holds the test membership table) once shards are done; the job finishes
            // on the others with the same bytes, so no row is lost or written twice.
            var spec = Spec("c3.jsonl", 3, shardRows: 2);
            var run = ScoringJobClient.RunAsync(cluster.Client, spec);
            var job = cluster.Client.GetGrain<IScoringJobGrain>(spec.Output);
            while (!run.IsCompleted && (await job.GetProgressAsync()).ShardsDone < 3) await Task.Delay(50);
            Assert.IsFalse(run.IsCompleted, "the job ended before a silo could be killed mid-job");
            await cluster.KillSiloAsync(cluster.Silos[2]);
            p = await run;
            Assert.AreEqual(ScoringJobStatus.Complete, p.Status, p.Error);
            Assert.AreEqual(20, p.Shards);
            AssertSameAsScore("c3.jsonl", 3);
        }
        finally
        {
            await cluster.StopAllSilosAsync();
        }
    }

    [TestMethod]
    public void ClusterCommandsRejectBadOptionsInOneLine()
    {
        var (code, _, err) = Cli.Run("cluster", "score", "-m", Model, "-i", _dir["missing.jsonl"], "-o", _dir["x.jsonl"], "--bits", "4");
        Assert.AreEqual(2, code);
        StringAssert.StartsWith(err, "error: no input file there");
        (code, _, err) = Cli.Run("cluster", "score", "-m", Model, "-i", _dir["in.jsonl"], "-o", _dir["x.jsonl"], "--bits", "4", "--redis", "localhost");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "must be HOST:PORT");
        (code, _, err) = Cli.Run("cluster", "silo", "--models", _dir["no-such-dir"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "no models directory there");
        Assert.AreEqual(1, err.Trim().Split('\n').Length, err);
    }

    /// <summary>
    /// Real processes on loopback with a real Redis: two `anyprec cluster silo` and one `cluster score`; one silo is
    /// killed with SIGKILL mid-job and the output is still `score`'s. Then everything is restarted (silos, client, and
    /// Redis itself when the test started it, from its append-only file) and the job resubmitted: no shard is scored again.
    /// Redis comes from ANYPREC_TEST_REDIS (HOST:PORT; .ci/run starts one) or redis-server on PATH.
    /// </summary>
    [TestMethod]
    [Timeout(240_000, CooperativeCancellation = true)]
    public async Task ProcessesWithRedisSurviveKillNineAndResumeWithoutRescoring()
    {
        string run = "t" + Guid.NewGuid().ToString("N")[..8]; // own cluster and service ids: a shared Redis keeps other runs apart
        await using var redis = await RedisServer.StartAsync(_dir[run + "-redis"]);
        string[] Cluster() => ["--redis", redis.Address, "--cluster-id", run, "--service-id", run];
        var output = _dir["p4.jsonl"];
        string[] score = ["cluster", "score", "-m", Model, "-i", _dir["in.jsonl"], "-o", output, "--bits", "4", "--shard-rows", "2", "--json", .. Cluster()];

        var (a, b) = await StartTwoSilosAsync(Cluster());
        await using (a)
        await using (b)
        {
            var client = Child.Start(score);
            await using (client)
            {
                // Kill -9 silo b once it has scored two shards, while the job still has shards to hand out.
                while (b.Count("worker: scored shard") < 2 && !client.Process.HasExited) await Task.Delay(50);
                Assert.IsFalse(client.Process.HasExited, "the job ended before a silo could be killed: " + client.Output);
                b.Process.Kill();
                Assert.AreEqual(0, await client.ExitAsync(), client.Output);
            }
            CollectionAssert.AreEqual(File.ReadAllBytes(_dir["score4.jsonl"]), File.ReadAllBytes(output), "not the bytes `score --bits 4` wrote");
            CollectionAssert.AreEqual(File.ReadAllBytes(_dir["score4.jsonl.errors.jsonl"]), File.ReadAllBytes(output + ".errors.jsonl"));
            var shards = ScoredShards(a).Concat(ScoredShards(b)).ToList();
            CollectionAssert.AreEquivalent(Enumerable.Range(0, 20).ToList(), shards.Distinct().ToList(), "every shard scored");
            // A shard is recorded done before its silo gets another, so at the kill at most one shard per silo is
            // unrecorded (in flight, or finished while the job's own silo died): only those may be scored again.
            Assert.IsLessThanOrEqualTo(20 + 2, shards.Count, "more shards scored again than were in flight at the kill: " + string.Join(",", shards));
            Assert.IsLessThanOrEqualTo(2, shards.GroupBy(k => k).Max(g => g.Count()), string.Join(",", shards));
            await a.StopAsync();
        }

        // Restart everything and resubmit: the job state in Redis says every shard is done.
        await redis.RestartAsync();
        var (a2, b2) = await StartTwoSilosAsync(Cluster());
        await using (a2)
        await using (b2)
        {
            var again = Child.Start(score);
            await using (again)
            {
                Assert.AreEqual(0, await again.ExitAsync(), again.Output);
                using var summary = JsonDocument.Parse(again.Output.Split('\n').Last(l => l.StartsWith('{')));
                Assert.AreEqual(0, summary.RootElement.GetProperty("shards_scored").GetInt32(), again.Output);
                Assert.AreEqual(20, summary.RootElement.GetProperty("shards_already_done").GetInt32());
            }
            Assert.AreEqual(0, a2.Count("worker: scored shard") + b2.Count("worker: scored shard"), "a restarted silo scored a shard again");
            CollectionAssert.AreEqual(File.ReadAllBytes(_dir["score4.jsonl"]), File.ReadAllBytes(output));
        }
    }

    private static async Task<(Child, Child)> StartTwoSilosAsync(string[] cluster)
    {
        string[] Silo() => ["cluster", "silo", "--models", _dir["models"], "--port", $"{FreePort()}", "--gateway-port", $"{FreePort()}", .. cluster];
        var (a, b) = (Child.Start(Silo()), Child.Start(Silo()));
        try
        {
            await Task.WhenAll(a.WaitForSiloAsync(), b.WaitForSiloAsync());
            return (a, b);
        }
        catch
        {
            await a.DisposeAsync();
            await b.DisposeAsync();
            throw;
        }
    }

    private static IEnumerable<int> ScoredShards(Child silo) =>
        silo.Lines().Select(l => System.Text.RegularExpressions.Regex.Match(l, @"worker: scored shard (\d+) of")).Where(m => m.Success).Select(m => int.Parse(m.Groups[1].Value));

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    /// <summary>`dotnet anyprec.dll ...` with its output (stdout and stderr) collected line by line.</summary>
    private sealed class Child : IAsyncDisposable
    {
        private readonly ConcurrentQueue<string> _lines = new();
        public Process Process { get; }

        private Child(string file, IEnumerable<string> args)
        {
            var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args) start.ArgumentList.Add(a);
            Process = new Process { StartInfo = start };
            Process.OutputDataReceived += (_, e) => { if (e.Data is not null) _lines.Enqueue(e.Data); };
            Process.ErrorDataReceived += (_, e) => { if (e.Data is not null) _lines.Enqueue(e.Data); };
            Process.Start();
            Process.BeginOutputReadLine();
            Process.BeginErrorReadLine();
        }

        public static Child Start(string[] args) => new("dotnet", [Path.Combine(AppContext.BaseDirectory, "anyprec.dll"), .. args]);
        public static Child StartProgram(string file, string[] args) => new(file, args);

        public async Task WaitForSiloAsync()
        {
            var until = DateTime.UtcNow + TimeSpan.FromSeconds(90);
            while (Count("silo up:") == 0)
            {
                if (Process.HasExited || DateTime.UtcNow > until) Assert.Fail("the silo did not start: " + Output);
                await Task.Delay(100);
            }
        }

        public IReadOnlyList<string> Lines() => [.. _lines];
        public int Count(string text) => _lines.Count(l => l.Contains(text, StringComparison.Ordinal));
        public string Output => string.Join("\n", _lines);

        public async Task<int> ExitAsync()
        {
            using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(150));
            await Process.WaitForExitAsync(limit.Token);
            Process.WaitForExit(); // drains the output events
            return Process.ExitCode;
        }

        /// <summary>SIGTERM: a silo leaves the cluster in order.</summary>
        public async Task StopAsync()
        {
            if (Process.HasExited) return;
            using (var kill = Process.Start("kill", ["-TERM", Process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)])) await kill.WaitForExitAsync();
            using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            try { await Process.WaitForExitAsync(limit.Token); }
            catch (OperationCanceledException) { Process.Kill(); }
        }

        public async ValueTask DisposeAsync()
        {
            if (!Process.HasExited) { Process.Kill(); await Process.WaitForExitAsync(); }
            Process.Dispose();
        }
    }

    /// <summary>The test's Redis: ANYPREC_TEST_REDIS when set (left running), else a redis-server from PATH on a free loopback port, append-only so a restart keeps its data.</summary>
    private sealed class RedisServer : IAsyncDisposable
    {
        private readonly string _dir;
        private readonly int _port;
        private Child? _server;

        public string Address { get; }

        private RedisServer(string address, string dir, int port) => (Address, _dir, _port) = (address, dir, port);

        public static async Task<RedisServer> StartAsync(string dir)
        {
            if (Environment.GetEnvironmentVariable("ANYPREC_TEST_REDIS") is { Length: > 0 } given) return new RedisServer(given, dir, 0);
            if (FindOnPath("redis-server") is null)
                Assert.Fail("redis-server is not installed: this test needs a real Redis (apt-get install -y redis-server, which .ci/run does), or ANYPREC_TEST_REDIS=HOST:PORT.");
            Directory.CreateDirectory(dir);
            int port = FreePort();
            var redis = new RedisServer($"127.0.0.1:{port}", dir, port);
            await redis.LaunchAsync();
            return redis;
        }

        private async Task LaunchAsync()
        {
            _server = Child.StartProgram("redis-server", ["--port", $"{_port}", "--bind", "127.0.0.1", "--dir", _dir, "--appendonly", "yes", "--appendfsync", "always", "--save", ""]);
            var until = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            while (_server.Count("Ready to accept connections") == 0)
            {
                if (_server.Process.HasExited || DateTime.UtcNow > until)
                {
                    await _server.DisposeAsync();
                    Assert.Fail("redis-server did not start: " + _server.Output);
                }
                await Task.Delay(50);
            }
        }

        /// <summary>Stops Redis (SIGTERM: it flushes the append-only file) and starts it again on the same port and files; a given Redis is left as it is.</summary>
        public async Task RestartAsync()
        {
            if (_server is null) return;
            await _server.StopAsync();
            await _server.DisposeAsync();
            await LaunchAsync();
        }

        private static string? FindOnPath(string name) =>
            (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Select(d => Path.Combine(d, name)).FirstOrDefault(File.Exists);

        public async ValueTask DisposeAsync()
        {
            if (_server is not null) await _server.DisposeAsync();
        }
    }
}
