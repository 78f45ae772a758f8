using System.Diagnostics;
using System.Text.RegularExpressions;
using AnyPrecML.Cli;

namespace AnyPrecML.Tests;

/// <summary>The CLI's one progress display: a bar with ETA on a terminal, plain lines when redirected.</summary>
[TestClass]
public sealed class ProgressTests
{
    [TestMethod]
    public void RedirectedProgressIsAPlainLinePerTenthWithElapsedAndEta()
    {
        var w = new StringWriter();
        var p = new ConsoleProgress<int>(w, "work", d => (d, 20), "items");
        for (int i = 1; i <= 20; i++) p.Report(i);
        var lines = w.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(11, lines, w.ToString());   // 1/20 (0%), then each tenth, then 20/20
        Assert.DoesNotContain('\r', w.ToString());
        Assert.DoesNotContain('\u001b', w.ToString());
        foreach (var line in lines[..^1]) Assert.MatchesRegex(@"^work: \d+/20 items \(\d+%, \d+\.\d s elapsed, ETA \d+\.\d s\)$", line);
        Assert.MatchesRegex(@"^work: 20/20 items \(100%, \d+\.\d s\)$", lines[^1]);
        Assert.StartsWith("work: 10/20 items (50%, ", lines[5]);
    }

    [TestMethod]
    public void OnATerminalTheBarIsRedrawnInPlaceAndLinesGoAboveIt()
    {
        var w = new StringWriter();
        var p = new ConsoleProgress<int>(w, "work", d => (d, 4), "items", interactive: true);
        p.Report(1);
        p.Line("a message");
        p.Report(2);                       // within 100 ms of the last draw: not redrawn
        p.Report(4);                       // finished: always drawn, then the line ends
        string s = w.ToString();
        string firstBar = $"work [{new string('#', 7)}{new string('.', 23)}]  25% 1/4 items ";
        Assert.StartsWith("\r" + firstBar, s);
        Assert.MatchesRegex(@"items [\d.]+ items/s, ETA \d+\.\d s\u001b\[K\r\u001b\[Ka message\n", s);
        Assert.DoesNotContain("2/4", s);
        Assert.MatchesRegex($@"\rwork \[{new string('#', 30)}\] 100% 4/4 items done in \d+\.\d s\u001b\[K\n$", s);
        Assert.AreEqual(1, s.Count(c => c == '\n') - 1, "one line for the message, one at the end");
    }

    [TestMethod]
    public void AnUnknownTotalShowsTheCountAndRate()
    {
        var w = new StringWriter();
        var p = new ConsoleProgress<long>(w, "score", n => (n, 0), "rows", plainEvery: 5);
        for (long i = 1; i <= 12; i++) p.Report(i);
        var lines = w.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        CollectionAssert.AreEqual(new[] { "score: 1 rows", "score: 5 rows", "score: 10 rows" }, lines.Select(l => l[..l.IndexOf(" (", StringComparison.Ordinal)]).ToArray());
        Assert.MatchesRegex(@"\([\d.]+ rows/s, \d+\.\d s elapsed\)$", lines[^1]);
    }

    [TestMethod]
    public void TheToolWithRedirectedStandardErrorPrintsPlainProgressLines()
    {
        // A real process whose stderr is a pipe: the terminal test must choose plain lines by itself.
        using var dir = TestData.NewTempDir();
        var start = new ProcessStartInfo("dotnet", [Path.Combine(AppContext.BaseDirectory, "anyprec.dll"), "convert", "--model", TestData.Stories260K, "--output", dir["hf"]])
        {
            RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        using var child = Process.Start(start)!;
        var stderr = child.StandardError.ReadToEndAsync();
        string stdout = child.StandardOutput.ReadToEnd();
        child.WaitForExit();
        Assert.AreEqual(0, child.ExitCode, stderr.Result);
        StringAssert.StartsWith(stdout, "wrote ");
        Assert.DoesNotContain('\r', stderr.Result);
        Assert.DoesNotContain('\u001b', stderr.Result);
        long bytes = new FileInfo(dir["hf/model.safetensors"]).Length;
        StringAssert.Contains(stderr.Result, "convert: ");
        Assert.MatchesRegex(@"convert: (\d+)/\1 bytes \(100%, \d+\.\d s\)", stderr.Result);
        Assert.IsLessThan(bytes, long.Parse(Regex.Match(stderr.Result, @"/(\d+) bytes \(100%").Groups[1].Value), "the tensors' bytes, less than the file with its header");
    }
}
