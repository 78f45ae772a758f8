using System.Globalization;
using System.IO.Compression;
using System.Text.Json;

namespace AnyPrecML.Examples.Tests;

/// <summary>The packages as a user gets them: packed, installed from the pack folder, used from a fresh project.</summary>
[TestClass]
public sealed class PackageTests
{
    private static string Nupkg(string id) => Path.Combine(PackedFeed.Folder, $"{id}.{PackedFeed.Version}.nupkg");

    [TestMethod]
    public void LibrariesCarryReadmeLicenseUrlDocsAndSymbols()
    {
        foreach (string id in PackedFeed.Libraries)
        {
            using var zip = ZipFile.OpenRead(Nupkg(id));
            string nuspec = new StreamReader(zip.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal)).Open()).ReadToEnd();
            StringAssert.Contains(nuspec, "<license type=\"expression\">MIT</license>", id);
            StringAssert.Contains(nuspec, "<readme>README.md</readme>", id);
            StringAssert.Contains(nuspec, "<projectUrl>", id);
            Assert.IsNotNull(zip.GetEntry("README.md"), $"{id} has no README.md");
            Assert.IsNotNull(zip.GetEntry($"lib/net10.0/{id}.xml"), $"{id} has no XML docs");
            Assert.IsTrue(File.Exists(Path.Combine(PackedFeed.Folder, $"{id}.{PackedFeed.Version}.snupkg")), $"{id} has no symbol package");
        }
    }

    [TestMethod]
    public void ToolPackageHoldsOnlyItsOwnPlatformsNatives()
    {
        string rid = System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier;
        Assert.IsTrue(OperatingSystem.IsLinux(), "the native file names below are Linux's");
        string path = Path.Combine(PackedFeed.Folder, $"{PackedFeed.Tool}.{rid}.{PackedFeed.Version}.nupkg");
        using var zip = ZipFile.OpenRead(path);
        // A RID-specific publish puts its platform's natives beside the assemblies; a portable one keeps every
        // platform's under runtimes/ (ONNX Runtime's iOS and Android builds, SkiaSharp's for each OS: 244 MB).
        var names = zip.Entries.Select(e => e.FullName).ToList();
        Assert.Contains($"tools/net10.0/{rid}/libonnxruntime.so", names, "ONNX Runtime's native library is missing");
        var foreign = names.Where(n => n.Contains("/runtimes/", StringComparison.Ordinal) || n.EndsWith(".dylib", StringComparison.Ordinal)
            || n.EndsWith("onnxruntime.dll", StringComparison.Ordinal) || n.EndsWith("libSkiaSharp.dll", StringComparison.Ordinal)).ToList();
        Assert.IsEmpty(foreign, "natives of other platforms:\n" + string.Join('\n', foreign));
        long bytes = new FileInfo(path).Length;
        Console.WriteLine($"{Path.GetFileName(path)}: {bytes / 1e6:F1} MB");
        Assert.IsLessThan(60_000_000L, bytes, $"the {rid} tool package is {bytes / 1e6:F1} MB");
    }

    [TestMethod]
    public void ToolInstalledFromThePackGeneratesFromPath()
    {
        var dir = Repo.NewTempDir("tool");
        try
        {
            string tools = Path.Combine(dir.FullName, "tools");
            // The README's command, from the repository root: nuget.config maps AnyPrecML* to artifacts/ (and
            // `--add-source` is refused beside a source mapping).
            var (code, output, err) = Repo.Dotnet(Repo.Root, TimeSpan.FromMinutes(4), PackedFeed.ConsumerEnvironment,
                "tool", "install", PackedFeed.Tool, "--version", PackedFeed.Version, "--tool-path", tools);
            Assert.AreEqual(0, code, $"tool install failed:\n{output}\n{err}");

            // `anyprec` found on PATH, as a shell finds it after the README's `export PATH`.
            var path = new Dictionary<string, string> { ["PATH"] = tools + Path.PathSeparator + Environment.GetEnvironmentVariable("PATH") };
            string anyprec = Enumerable.Select(path["PATH"].Split(Path.PathSeparator), d => Path.Combine(d, "anyprec")).First(File.Exists);
            Assert.AreEqual(Path.Combine(tools, "anyprec"), anyprec);
            (code, output, err) = Repo.Run(anyprec, ["generate", "--model", Repo.Stories260K("stories260K.bin"), "--max-tokens", "200", "--json"],
                dir.FullName, TimeSpan.FromMinutes(2), path);
            Assert.AreEqual(0, code, $"anyprec generate failed:\n{output}\n{err}");
            using var doc = JsonDocument.Parse(output);
            // llama2.c's own run of stories260K from BOS, greedy, starts so.
            Assert.StartsWith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.", doc.RootElement.GetProperty("text").GetString());
            Assert.AreEqual(200, doc.RootElement.GetProperty("tokens").GetInt32());
        }
        finally
        {
            Repo.Delete(dir);
        }
    }

    /// <summary>The ```csharp block after "marker" in README.md, as written.</summary>
    private static string ReadmeBlock(string marker)
    {
        var lines = File.ReadAllLines(Repo.At("README.md"));
        int at = Array.FindIndex(lines, l => l.StartsWith(marker, StringComparison.Ordinal));
        Assert.IsGreaterThanOrEqualTo(0, at, $"README.md has no '{marker}'");
        int open = Array.FindIndex(lines, at, l => l.StartsWith("```csharp", StringComparison.Ordinal));
        int close = Array.FindIndex(lines, open + 1, l => l.StartsWith("```", StringComparison.Ordinal));
        return string.Join('\n', lines[(open + 1)..close]) + "\n";
    }

    [TestMethod]
    public void ReadmeMLNetSnippetRunsInANewConsoleProject()
    {
        var dir = Repo.NewTempDir("console");
        try
        {
            // What the README tells a newcomer to put in the folder: the model, its tokenizer, the sample text.
            File.Copy(Repo.Stories260K("stories260K.bin"), Path.Combine(dir.FullName, "stories260K.bin"));
            File.Copy(Repo.Stories260K("tok512.model"), Path.Combine(dir.FullName, "tok512.model"));
            File.Copy(Repo.At("samples", "data", "calib.txt"), Path.Combine(dir.FullName, "calib.txt"));
            File.WriteAllText(Path.Combine(dir.FullName, "Program.cs"), ReadmeBlock("<!-- snippet: mlnet"));
            File.WriteAllText(Path.Combine(dir.FullName, "app.csproj"), $"""
                <Project Sdk="Microsoft.NET.Sdk">
                  <PropertyGroup>
                    <OutputType>Exe</OutputType>
                    <TargetFramework>net10.0</TargetFramework>
                    <ImplicitUsings>enable</ImplicitUsings>
                    <Nullable>enable</Nullable>
                    <RestoreAdditionalProjectSources>{PackedFeed.Folder}</RestoreAdditionalProjectSources>
                  </PropertyGroup>
                  <ItemGroup>
                    <PackageReference Include="AnyPrecML.MLNet" Version="{PackedFeed.Version}" />
                  </ItemGroup>
                </Project>
                """);
            var (code, output, err) = Repo.Dotnet(dir.FullName, TimeSpan.FromMinutes(5), PackedFeed.ConsumerEnvironment, "run", "-c", "Release");
            Assert.AreEqual(0, code, $"the README's ML.NET snippet failed:\n{output}\n{err}");

            // One perplexity per line of calib.txt, at 3 bits: finite, and better than guessing among the 512 tokens.
            var perplexities = output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(l => double.Parse(l, CultureInfo.InvariantCulture)).ToList();
            Assert.HasCount(File.ReadAllLines(Repo.At("samples", "data", "calib.txt")).Count(l => l.Length > 0), perplexities, output);
            foreach (double p in perplexities) Assert.IsTrue(p > 1 && p < 512, $"perplexity {p}");
            Assert.IsTrue(File.Exists(Path.Combine(dir.FullName, "scorer.zip")), "the snippet saves scorer.zip");
        }
        finally
        {
            Repo.Delete(dir);
        }
    }
}
