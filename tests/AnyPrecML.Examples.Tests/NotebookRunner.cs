using Microsoft.DotNet.Interactive;
using Microsoft.DotNet.Interactive.Commands;
using Microsoft.DotNet.Interactive.CSharp;
using Microsoft.DotNet.Interactive.Documents.Jupyter;
using Microsoft.DotNet.Interactive.Events;
using Microsoft.DotNet.Interactive.PackageManagement;

namespace AnyPrecML.Examples.Tests;

/// <summary>
/// Runs a Polyglot notebook's C# cells top to bottom on .NET Interactive's C# kernel, in-process, in the notebook's own
/// folder (as Polyglot Notebooks does), with `#r "nuget: ..."` and `#i` working. Stops at the first failed cell.
/// </summary>
internal static class NotebookRunner
{
    public sealed record Cell(int Number, string Code, string Output, TimeSpan Time);

    public sealed class CellFailedException(int number, string message) : Exception($"cell {number} failed: {message}")
    {
        public int Number { get; } = number;
    }

    /// <summary>The cells run (numbered from 1 over all cells, markdown included, as the notebook shows them).</summary>
    public static async Task<IReadOnlyList<Cell>> RunAsync(string notebookPath, TimeSpan cellTimeout)
    {
        var document = Notebook.Parse(await File.ReadAllTextAsync(notebookPath));
        string previous = Environment.CurrentDirectory;
        Environment.CurrentDirectory = Path.GetDirectoryName(Path.GetFullPath(notebookPath))!;
        try
        {
            // forceRestore: the packs change under the same version, so no restore result may be reused across runs.
            using var kernel = new CSharpKernel().UseNugetDirective((k, references) =>
            {
                k.AddAssemblyReferences(references.SelectMany(r => r.AssemblyPaths));
                return Task.CompletedTask;
            }, forceRestore: true);
            var cells = new List<Cell>();
            int number = 0;
            foreach (var element in document.Elements)
            {
                number++;
                if (element.KernelName is not ("csharp" or "C#")) continue;
                var watch = System.Diagnostics.Stopwatch.StartNew();
                var run = kernel.SendAsync(new SubmitCode(element.Contents));
                if (await Task.WhenAny(run, Task.Delay(cellTimeout)) != run)
                    throw new CellFailedException(number, $"still running after {cellTimeout.TotalSeconds:F0} s");
                var result = await run;
                var output = new System.Text.StringBuilder();
                foreach (var e in result.Events)
                {
                    if (e is CommandFailed failed) throw new CellFailedException(number, failed.Message);
                    if (e is DisplayEvent shown)
                        foreach (var value in shown.FormattedValues.Where(v => v.MimeType == "text/plain")) output.AppendLine(value.Value);
                }
                cells.Add(new Cell(number, element.Contents, output.ToString(), watch.Elapsed));
            }
            return cells;
        }
        finally
        {
            Environment.CurrentDirectory = previous;
        }
    }
}
