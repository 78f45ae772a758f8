using System.Diagnostics;
using System.Text.Json;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

/// <summary>Runs the built `anyprec` as a real child process (its own memory, its own file locks, killable).</summary>
internal static class ChildCli
{
    public static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet")
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "anyprec.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        using var p = Start(args);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(3))) { p.Kill(entireProcessTree: true); Assert.Fail("anyprec did not finish in 3 minutes"); }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }
}

/// <summary>score's output safety: lock, manifest-checked resume, durable checkpoints, bounded memory on huge rows.</summary>
[TestClass]
public sealed class ScoreJobTests
{
    private static TestData.TempDir _dir = null!;
    private static string[] _args = null!;
    private static int _validRows, _records;

    /// <summary>One model, one input (whole stories, one invalid line) and the output of an uninterrupted run, shared by the tests.</summary>
    [ClassInitialize]
    public static void UninterruptedRun(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 4 });
        // Enough rows (16 stories, six times) that a fast machine is still mid-run when the kill test strikes.
        var stories = File.ReadLines(TestData.TinyStories).Where(l => l.Trim().Length > 0).Take(16).Select(t => JsonSerializer.Serialize(new { text = t })).ToList();
        var lines = Enumerable.Repeat(stories, 6).SelectMany(x => x).ToList();
        lines.Insert(5, "{\"text\": \"a torn line");
        _records = lines.Count;
        _validRows = lines.Count - 1;
        File.WriteAllLines(_dir["in.jsonl"], lines);
        _args = ["score", "--model", _dir["ap"], "--input", _dir["in.jsonl"], "--bits", "3", "--completion-tokens", "6"];
        var (code, _, err) = Cli.Run([.. _args, "--output", _dir["reference.jsonl"]]);
        Assert.AreEqual(0, code, err);
        Assert.HasCount(_validRows, File.ReadAllLines(_dir["reference.jsonl"]));
        var errors = File.ReadAllLines(_dir["reference.jsonl.errors.jsonl"]);
        Assert.HasCount(1, errors);
        using var e = JsonDocument.Parse(errors[0]);
        Assert.AreEqual(6, e.RootElement.GetProperty("line").GetInt32(), "the invalid row is reported with its 1-based line number");
        Assert.AreEqual(5, e.RootElement.GetProperty("row").GetInt32());
        StringAssert.Contains(e.RootElement.GetProperty("error").GetString(), "not valid JSON");
    }

    [ClassCleanup]
    public static void Cleanup() => _dir.Dispose();

    private static JsonElement Manifest(string output)
    {
        // The manifest is replaced by rename, so a read sees one whole version.
        using var doc = JsonDocument.Parse(File.ReadAllText(output + ".manifest.json"));
        return doc.RootElement.Clone();
    }

    private static void WaitFor(Func<bool> condition, Process p, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.IsFalse(p.HasExited, $"the child exited before {what}: {p.StandardError.ReadToEnd()}");
            Assert.IsLessThan(120, sw.Elapsed.TotalSeconds, $"timed out waiting for {what}");
            Thread.Sleep(20);
        }
    }

    [TestMethod]
    public void KillNineDuringScoreThenResumeGivesTheUninterruptedFile()
    {
        string output = _dir["killed.jsonl"];
        using (var child = ChildCli.Start([.. _args, "--output", output, "--checkpoint-rows", "2"]))
        {
            // Past two checkpoints, and with rows written after the last one: the kill lands mid-run.
            WaitFor(() => File.Exists(output + ".manifest.json") && Manifest(output).GetProperty("rows_done").GetInt64() >= 4, child, "two checkpoints");
            child.Kill(entireProcessTree: true); // SIGKILL: no handler runs, no buffer is flushed
            child.WaitForExit();
        }
        var killed = Manifest(output);
        Assert.IsFalse(killed.GetProperty("complete").GetBoolean(), "the child was killed before it finished");
        Assert.IsLessThan(_records, killed.GetProperty("rows_done").GetInt64());

        var (code, json, err) = Cli.Run([.. _args, "--output", output, "--resume", "--json"]);
        Assert.AreEqual(0, code, err);
        using (var doc = JsonDocument.Parse(json))
            Assert.AreEqual(killed.GetProperty("rows_done").GetInt64(), doc.RootElement.GetProperty("skipped").GetInt64(), "the resumed run starts at the last checkpoint");
        CollectionAssert.AreEqual(File.ReadAllBytes(_dir["reference.jsonl"]), File.ReadAllBytes(output), "resumed output equals the uninterrupted run's, byte for byte");
        CollectionAssert.AreEqual(File.ReadAllBytes(_dir["reference.jsonl.errors.jsonl"]), File.ReadAllBytes(output + ".errors.jsonl"));
        Assert.IsTrue(Manifest(output).GetProperty("complete").GetBoolean());
    }

    [TestMethod]
    public void SecondConcurrentWriterIsRefusedAndTheFirstCompletes()
    {
        string output = _dir["locked.jsonl"];
        using var first = ChildCli.Start([.. _args, "--output", output]);
        var firstErr = first.StandardError.ReadToEndAsync();
        WaitFor(() => File.Exists(output + ".manifest.json"), first, "the first run's manifest");
        var sw = Stopwatch.StartNew();
        var (code, _, err) = ChildCli.Run([.. _args, "--output", output]);
        double secondSeconds = sw.Elapsed.TotalSeconds;
        Assert.AreEqual(2, code, err);
        StringAssert.StartsWith(err, "error: another score run is writing this file (it is locked)");
        Assert.IsFalse(first.HasExited, $"the second run was refused while the first still ran (it took {secondSeconds:F1} s)");
        first.WaitForExit();
        Assert.AreEqual(0, first.ExitCode, firstErr.Result);
        CollectionAssert.AreEqual(File.ReadAllBytes(_dir["reference.jsonl"]), File.ReadAllBytes(output), "the first run's output is complete and untouched");
    }

    [TestMethod]
    public void ResumeOfAnotherJobIsRefusedAndChangesNothing()
    {
        string output = _dir["refuse.jsonl"];
        File.Copy(_dir["reference.jsonl"], output);
        File.Copy(_dir["reference.jsonl.manifest.json"], output + ".manifest.json");
        File.Copy(_dir["reference.jsonl.errors.jsonl"], output + ".errors.jsonl");
        var before = File.ReadAllBytes(output);

        var (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["in.jsonl"], "--bits", "4", "--completion-tokens", "6", "--output", output, "--resume");
        Assert.AreEqual(2, code, err);
        StringAssert.Contains(err, "--resume refused: the output was written with width (--bits) 3, this run has 4");

        File.WriteAllLines(_dir["other.jsonl"], File.ReadLines(_dir["in.jsonl"]).Skip(1));
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["other.jsonl"], "--bits", "3", "--completion-tokens", "6", "--output", output, "--resume");
        Assert.AreEqual(2, code, err);
        StringAssert.Contains(err, "--resume refused: the output was written with input (content SHA-256)");

        (code, _, err) = Cli.Run([.. _args, "--output", output]);
        Assert.AreEqual(2, code, err);
        StringAssert.Contains(err, "pass --resume");

        File.Delete(output + ".manifest.json");
        (code, _, err) = Cli.Run([.. _args, "--output", output, "--resume"]);
        Assert.AreEqual(2, code, err);
        StringAssert.Contains(err, "has no manifest");
        CollectionAssert.AreEqual(before, File.ReadAllBytes(output), "a refused run leaves the output as it was");
    }

    [TestMethod]
    public void LongRowsAreTruncatedWithAWarningOrRejected()
    {
        string text = string.Join(' ', File.ReadLines(TestData.TinyStories).Take(3));
        File.WriteAllLines(_dir["long.jsonl"], [JsonSerializer.Serialize(new { text }), JsonSerializer.Serialize(new { text = text[..300] })]);
        var (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["long.jsonl"], "--output", _dir["long-t.jsonl"], "--max-row-chars", "300");
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(err, "warning: row 0 is longer than --max-row-chars 300");
        var rows = File.ReadAllLines(_dir["long-t.jsonl"]);
        Assert.AreEqual(rows[1].Replace("\"row\":1", "\"row\":0"), rows[0], "a truncated row scores exactly as its first 300 characters");

        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["long.jsonl"], "--output", _dir["long-r.jsonl"], "--max-row-chars", "300", "--long-rows", "reject");
        Assert.AreEqual(0, code, err);
        Assert.HasCount(1, File.ReadAllLines(_dir["long-r.jsonl"]));
        StringAssert.Contains(File.ReadAllText(_dir["long-r.jsonl.errors.jsonl"]), $"the text has {text.Length} characters, more than --max-row-chars 300");

        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["long.jsonl"], "--output", _dir["long-b.jsonl"], "--max-row-bytes", "1000");
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(File.ReadAllText(_dir["long-b.jsonl.errors.jsonl"]), "over --max-row-bytes 1000");
    }

    [TestMethod]
    public void FiftyMegabyteLineIsScoredInUnderOneGigabyteResident()
    {
        string input = _dir["huge.jsonl"];
        var words = File.ReadAllText(TestData.TinyStories).Replace('\n', ' ');
        using (var w = new StreamWriter(input))
        {
            w.WriteLine(JsonSerializer.Serialize(new { text = "Once upon a time there was a cat." }));
            w.Write("{\"text\": \"");
            long written = 0;
            while (written < 50_000_000) { string chunk = JsonSerializer.Serialize(words)[1..^1]; w.Write(chunk); written += chunk.Length; }
            w.WriteLine("\"}");
            w.WriteLine(JsonSerializer.Serialize(new { text = "The end." }));
        }
        Assert.IsGreaterThan(50_000_000L, new FileInfo(input).Length);
        // The memory bound is set by reading the record (up to --max-row-bytes); --max-row-chars only sets how much is
        // scored, kept small here so the test is quick.
        var (code, json, err) = ChildCli.Run("score", "--model", _dir["ap"], "--input", input, "--output", _dir["huge-out.jsonl"], "--max-row-chars", "20000", "--json");
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(err, "warning: row 1 is longer than --max-row-chars 20000");
        using var doc = JsonDocument.Parse(json);
        Assert.AreEqual(3, doc.RootElement.GetProperty("rows").GetInt32());
        long peak = doc.RootElement.GetProperty("peak_resident_bytes").GetInt64();
        Assert.IsLessThan(1L << 30, peak, $"peak resident {peak / (1 << 20)} MiB");
        Console.WriteLine($"50 MB line: peak resident {peak / (1 << 20)} MiB");
    }
}
