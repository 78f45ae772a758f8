using System.Globalization;
using System.Text.RegularExpressions;

namespace AnyPrecML.Examples.Tests;

/// <summary>Every sample in samples/ runs as the README says (`dotnet run samples/X.cs`), each in a temporary folder of its own.</summary>
[TestClass]
public sealed partial class SampleTests
{
    public static IEnumerable<object[]> Samples =>
        Directory.GetFiles(Repo.At("samples"), "*.cs").Order().Select(p => new object[] { Path.GetFileName(p) });

    // Run from an empty folder of its own: a sample finds its files from its own path, not the working directory.
    private static (int Code, string Out, string Err) RunSample(string name, DirectoryInfo dir) =>
        Repo.Dotnet(dir.FullName, TimeSpan.FromMinutes(6), null, "run", "-c", Repo.Configuration, Repo.At("samples", name));

    [TestMethod]
    [DynamicData(nameof(Samples))]
    public void SampleRunsInItsOwnFolderAndCleansUp(string name)
    {
        var dir = Repo.NewTempDir("sample");
        try
        {
            var (code, output, err) = RunSample(name, dir);
            Assert.AreEqual(0, code, $"{name} exited {code}:\n{output}\n{err}");
            Assert.IsEmpty(dir.GetFileSystemInfos(), $"{name} wrote into the working directory: {string.Join(", ", dir.GetFileSystemInfos().Select(f => f.Name))}");
            if (name == "AnyPrecisionTour.cs") CheckTour(output);
        }
        finally
        {
            Repo.Delete(dir);
        }
    }

    [GeneratedRegex(@"^(.*stories260K-anyprec-[^:/]+): one parent serving", RegexOptions.Multiline)]
    private static partial Regex TourFolder();

    [GeneratedRegex(@"^(\d) bits  perplexity +([0-9.]+)  Once upon a time", RegexOptions.Multiline)]
    private static partial Regex TourLine();

    /// <summary>
    /// The tour quantizes into a temporary folder of its own and removes it; it serves every width 3..8 from one
    /// parent, and the parent is the best of them on held-out text.
    /// </summary>
    private static void CheckTour(string output)
    {
        var folder = TourFolder().Match(output);
        Assert.IsTrue(folder.Success, output);
        Assert.IsFalse(Directory.Exists(folder.Groups[1].Value), $"the tour left {folder.Groups[1].Value} behind");
        var rows = TourLine().Matches(output).Select(m => (Bits: int.Parse(m.Groups[1].Value), Ppl: double.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture))).ToList();
        CollectionAssert.AreEqual(new[] { 3, 4, 5, 6, 7, 8 }, rows.Select(r => r.Bits).ToArray(), output);
        // stories260K's fp32 perplexity on these stories is about 5.4 (README): 8 bits is near it, 3 bits worse.
        Assert.IsLessThan(7.0, rows[^1].Ppl, output);
        Assert.IsLessThan(rows[0].Ppl, rows[^1].Ppl, output);
    }
}
