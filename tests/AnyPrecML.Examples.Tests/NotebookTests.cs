using System.Text.Json;

namespace AnyPrecML.Examples.Tests;

/// <summary>Every notebook in notebooks/ runs top to bottom against this run's packs; the repository keeps them without outputs.</summary>
[TestClass]
public sealed class NotebookTests
{
    public static IEnumerable<object[]> Notebooks =>
        Directory.GetFiles(Repo.At("notebooks"), "*.ipynb").Order().Select(p => new object[] { Path.GetFileName(p) });

    [TestMethod]
    public void EveryNotebookIsRunHere()
    {
        // The runs below are data-driven from the folder; this pins that the folder holds what the README names.
        CollectionAssert.IsSubsetOf(new[] { "AnyPrecisionPipeline.ipynb", "PerplexityAndSpeed.ipynb" }, Notebooks.Select(n => (string)n[0]).ToArray());
    }

    [TestMethod]
    [DynamicData(nameof(Notebooks))]
    public async Task NotebookRunsTopToBottom(string name)
    {
        _ = PackedFeed.Folder;   // the notebooks restore from ../artifacts
        // The kernel's restore runs `dotnet` as a child of this process: it takes the run's own packages folder.
        string? previous = Environment.GetEnvironmentVariable("NUGET_PACKAGES");
        Environment.SetEnvironmentVariable("NUGET_PACKAGES", PackedFeed.PackagesFolder);
        IReadOnlyList<NotebookRunner.Cell> cells;
        try
        {
            cells = await NotebookRunner.RunAsync(Repo.At("notebooks", name), TimeSpan.FromMinutes(4));
        }
        finally
        {
            Environment.SetEnvironmentVariable("NUGET_PACKAGES", previous);
        }
        foreach (var c in cells) Console.WriteLine($"cell {c.Number}: {c.Time.TotalSeconds:F1} s");
        string all = string.Concat(cells.Select(c => c.Output));
        // What each notebook is there to show, read from its own output.
        if (name == "AnyPrecisionPipeline.ipynb")
            StringAssert.Contains(all, "serves 3, 4, 5, 6, 7, 8 bits");
        if (name == "PerplexityAndSpeed.ipynb")
            StringAssert.Contains(all, "width for");
    }

    [TestMethod]
    [DynamicData(nameof(Notebooks))]
    public void NotebookIsStoredWithoutOutputs(string name)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Repo.At("notebooks", name)));
        int number = 0;
        foreach (var cell in doc.RootElement.GetProperty("cells").EnumerateArray())
        {
            number++;
            if (cell.GetProperty("cell_type").GetString() != "code") continue;
            Assert.AreEqual(0, cell.GetProperty("outputs").GetArrayLength(), $"{name} cell {number} has outputs: clear them before committing");
            Assert.AreEqual(JsonValueKind.Null, cell.GetProperty("execution_count").ValueKind, $"{name} cell {number} has an execution count");
        }
    }
}
